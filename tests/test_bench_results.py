"""bench/RESULTS.md: one section per machine type, so figures from different CPUs are never in one table."""

import re
from pathlib import Path

from bench.common import HEADER, PREAMBLE, Figure, machine, machine_type, machine_type_of, update_results
from bench.redis_wait import HEADING, replace_section

EPYC = "nproc 2, Python 3.11.7, AMD EPYC"
XEON = "nproc 8, Python 3.12.1, Intel Xeon"
PROSE = "## Load: 200 concurrent clients\n\nWritten by hand; | a | table | too |\n"


def section(path: Path, kind: str) -> str:
    """The text of machine type `kind`'s section ('' if there is none)."""
    begin, end = f"<!-- machine:{kind}:begin -->", f"<!-- machine:{kind}:end -->"
    text = path.read_text()
    assert text.count(begin) <= 1
    return text.split(begin, 1)[1].split(end, 1)[0] if begin in text else ""


def rows(text: str) -> list[list[str]]:
    """The figure rows of the results table(s) in `text`, as cells."""
    found = []
    for table in re.findall(r"<!-- results:begin -->(.*?)<!-- results:end -->", text, re.S):
        for line in table.strip().splitlines()[2:]:  # header and its rule
            found.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
    return found


def figures(text: str) -> list[tuple[str, str, str]]:
    return [(cells[0], cells[1], cells[2]) for cells in rows(text)]


def record(path: Path, on_machine: str, benchmark: str, values: dict[str, str], note: str | None = None) -> None:
    figures = [(benchmark, Figure(name, value)) for name, value in values.items()]
    notes = {benchmark: note} if note is not None else {}
    update_results([benchmark], figures, "python -m bench.x", notes, "0.00 other", path, on_machine=on_machine)


def test_machine_type_is_the_cpu_and_its_cores() -> None:
    assert machine_type_of(EPYC) == "AMD EPYC, 2 cores"
    assert machine_type_of(machine()) == machine_type()
    assert "Python" not in machine_type()


def test_two_machine_types_get_a_section_each(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    record(path, XEON, "1 dispatch", {"makespan": "7.00 s", "Bunch / arq": "1.9"})
    record(path, EPYC, "1 dispatch", {"makespan": "8.54 s", "Bunch / arq": "2.3"})

    text = path.read_text()
    assert text.index("## AMD EPYC, 2 cores") < text.index("## Intel Xeon, 8 cores")  # ordered by name
    assert figures(section(path, "AMD EPYC, 2 cores")) == [
        ("1 dispatch", "makespan", "8.54 s"),
        ("1 dispatch", "Bunch / arq", "2.3"),
    ]
    assert figures(section(path, "Intel Xeon, 8 cores")) == [
        ("1 dispatch", "makespan", "7.00 s"),
        ("1 dispatch", "Bunch / arq", "1.9"),
    ]
    machine_column = HEADER.index("machine")
    assert {cells[machine_column] for cells in rows(section(path, "Intel Xeon, 8 cores"))} == {XEON}
    assert {cells[machine_column] for cells in rows(section(path, "AMD EPYC, 2 cores"))} == {EPYC}


def test_a_rerun_replaces_only_that_benchmark_on_that_machine(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    record(path, EPYC, "2 dispatcher CPU", {"CPU per run": "2.1 ms"})
    record(path, EPYC, "1 dispatch", {"makespan": "8.54 s"})
    record(path, XEON, "1 dispatch", {"makespan": "7.00 s"})
    xeon_before = section(path, "Intel Xeon, 8 cores")

    record(path, EPYC, "1 dispatch", {"makespan": "8.10 s", "utilization": "98.8 %"})

    assert figures(section(path, "AMD EPYC, 2 cores")) == [
        ("1 dispatch", "makespan", "8.10 s"),
        ("1 dispatch", "utilization", "98.8 %"),
        ("2 dispatcher CPU", "CPU per run", "2.1 ms"),
    ]
    assert section(path, "Intel Xeon, 8 cores") == xeon_before


def test_notes_are_replaced_per_machine(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    record(path, EPYC, "exports", {"objects/s": "900"}, note="EPYC, first run")
    record(path, XEON, "exports", {"objects/s": "1500"}, note="Xeon's only run")
    record(path, EPYC, "1 dispatch", {"makespan": "8.54 s"}, note="dispatch on EPYC")
    record(path, EPYC, "exports", {"objects/s": "950"}, note="EPYC, second run")

    epyc, xeon = section(path, "AMD EPYC, 2 cores"), section(path, "Intel Xeon, 8 cores")
    assert "EPYC, second run" in epyc and "EPYC, first run" not in path.read_text()
    assert "Xeon's only run" in xeon and "Xeon's only run" not in epyc
    assert f"UTC, {XEON}; other load" in xeon
    assert epyc.count("<!-- notes:exports:begin -->") == 1
    assert epyc.index("<!-- notes:1 dispatch:begin -->") < epyc.index("<!-- notes:exports:begin -->")


def test_prose_after_the_sections_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    record(path, EPYC, "1 dispatch", {"makespan": "8.54 s"}, note="first")
    path.write_text(path.read_text() + "\n" + PROSE)  # as bench/redis_wait.py appends its section

    record(path, XEON, "1 dispatch", {"makespan": "7.00 s"}, note="other CPU")
    record(path, EPYC, "1 dispatch", {"makespan": "8.10 s"}, note="second")

    text = path.read_text()
    assert text.endswith(PROSE)
    assert text.count(PROSE) == 1
    assert text.index("<!-- machine:Intel Xeon, 8 cores:end -->") < text.index(PROSE)
    assert figures(text) == [("1 dispatch", "makespan", "8.10 s"), ("1 dispatch", "makespan", "7.00 s")]


def test_a_cell_with_a_pipe_survives_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    record(path, EPYC, "memory", {"peak | steady": "141 MB | 90 MB"})
    record(path, EPYC, "1 dispatch", {"makespan": "8.54 s"})
    record(path, EPYC, "2 dispatcher CPU", {"CPU per run": "2.1 ms"})

    assert figures(path.read_text())[-1] == ("memory", "peak \\| steady", "141 MB \\| 90 MB")


OLD_LAYOUT = f"""# Bunch benchmark results

Old preamble.

<!-- results:begin -->
| {" | ".join(HEADER)} |
|{"---|" * len(HEADER)}
| 1 dispatch | utilization | 93.6 % | ≥ 97 % | **FAIL** | `bench.dispatch` | {EPYC} | 0.02 other | 2026-12-02 08:01 |
| 1 dispatch | Bunch / arq | 2.332 | ≥ 1.000 | pass | `bench.dispatch` | {EPYC} | 0.02 other | 2026-12-02 08:01 |
| 2 dispatcher CPU | per run | 2.1 ms | ≤ 1 ms | **FAIL** | `bench.dispatch` | {EPYC} | 0.02 other | 2026-12-02 08:01 |
| 3 packaging | ZIP / raw copy | 96.6 % | ≥ 90 % | pass | `bench.packaging` | {XEON} | 0.03 other | 2026-11-26 19:20 |
<!-- results:end -->

## Notes

<!-- notes:1 dispatch:begin -->
Workload: 2000 runs.

_2026-12-02 08:01 UTC, {EPYC}; other load: 0.02 other._
<!-- notes:1 dispatch:end -->

<!-- notes:3 packaging:begin -->
500 objects.

_2026-11-26 19:20 UTC, {XEON}; other load: 0.03 other._
<!-- notes:3 packaging:end -->

{PROSE}"""


def test_the_old_single_table_layout_is_converted_on_the_first_write(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(OLD_LAYOUT)
    old_rows = rows(OLD_LAYOUT)

    record(path, EPYC, "4 gateway", {"requests/s": "1200"})

    text = path.read_text()
    assert text.startswith(PREAMBLE) and "Old preamble." not in text
    assert "\n## Notes\n" not in text
    assert text.endswith(PROSE)
    epyc, xeon = section(path, "AMD EPYC, 2 cores"), section(path, "Intel Xeon, 8 cores")
    assert rows(epyc) == [*old_rows[:3], rows(epyc)[3]]  # the old rows as they were, the new one after them
    assert figures(epyc)[3] == ("4 gateway", "requests/s", "1200")
    assert rows(xeon) == old_rows[3:]
    assert "Workload: 2000 runs." in epyc and "500 objects." in xeon
    assert re.findall(r"<!-- notes:(.+?):begin -->", text) == ["1 dispatch", "3 packaging"]

    converted = path.read_text()
    update_results([], [], "", {}, "", path, on_machine=EPYC)  # nothing new: the file stays as it is
    assert path.read_text() == converted


def test_the_replica_wait_section_replaces_its_last_run_and_the_copies_appended_before(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    appended = f"{HEADING}\n\nold figures\n\n| a | b |\n"
    path.write_text(f"# Bunch benchmark results\n\n{PROSE}\n{appended}\n{appended}")
    replace_section(path, f"{HEADING}\n\nrun 1")
    replace_section(path, f"{HEADING}\n\nrun 2")
    text = path.read_text()
    assert text.count(HEADING) == 1 and "run 2" in text
    assert "run 1" not in text and "old figures" not in text
    assert PROSE in text  # the hand-written section before them is kept whole
