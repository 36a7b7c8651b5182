"""How a job is cut into runs of at most `run_size` images, in closed form.

Nothing per run is stored before it starts: run k's images, and each image's prompt and
references, are computed from the job's config. That keeps a queued 10,000-image job at the cost
of one hash and one queue entry.
"""

from dataclasses import dataclass
from typing import Literal

from shared.models import AutomaticJobRequest, SemiAutoJobRequest

JobConfig = SemiAutoJobRequest | AutomaticJobRequest


@dataclass(frozen=True, slots=True)
class Slot:
    index: int
    prompt: str
    reference_ids: tuple[str, ...]
    input_id: str | None  # automatic mode: the input image this slot is a variation of


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def images_total(config: JobConfig) -> int:
    if isinstance(config, SemiAutoJobRequest):
        return len(config.prompts) * config.images_per_prompt
    return len(config.input_ids) * config.variations_per_image


def images_per_prompt(config: JobConfig) -> int:
    """The images made from one prompt: a run never spans two (automatic jobs have one prompt)."""
    return config.images_per_prompt if isinstance(config, SemiAutoJobRequest) else images_total(config)


def runs_total(config: JobConfig, run_size: int) -> int:
    if isinstance(config, SemiAutoJobRequest):
        # A run never mixes prompts: one Gemini "run" is one prompt's batch.
        return len(config.prompts) * _ceil_div(config.images_per_prompt, run_size)
    return _ceil_div(images_total(config), run_size)


def run_slots(config: JobConfig, run_index: int, run_size: int) -> range:
    """The image indices that run `run_index` produces."""
    if isinstance(config, SemiAutoJobRequest):
        per_prompt = _ceil_div(config.images_per_prompt, run_size)
        prompt_index, chunk = divmod(run_index, per_prompt)
        start = prompt_index * config.images_per_prompt + chunk * run_size
        end = min(start + run_size, (prompt_index + 1) * config.images_per_prompt)
        return range(start, end)
    start = run_index * run_size
    return range(start, min(start + run_size, images_total(config)))


def prompt_index(config: JobConfig, index: int) -> int:
    """Which of the job's prompts image `index` is made from (automatic jobs have one)."""
    return index // config.images_per_prompt if isinstance(config, SemiAutoJobRequest) else 0


def slot(config: JobConfig, index: int) -> Slot:
    if isinstance(config, SemiAutoJobRequest):
        prompt = config.prompts[index // config.images_per_prompt]
        return Slot(index, prompt, tuple(config.reference_ids), None)
    input_id = config.input_ids[index // config.variations_per_image]
    return Slot(index, config.base_prompt, (input_id,), input_id)


def task_name(config: JobConfig) -> Literal["semi_auto_generation", "automatic_generation"]:
    return "semi_auto_generation" if isinstance(config, SemiAutoJobRequest) else "automatic_generation"


EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


def image_file_name(index: int, mime_type: str | None) -> str:
    """An image's name in ZIPs and download links: its index, and the extension of its type."""
    return f"{index:05d}.{EXTENSIONS.get(mime_type or '', 'png')}"
