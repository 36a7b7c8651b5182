#!/usr/bin/env bash
# Regenerates the hashed lock files (requirements/README.md says which is which). Pins that still fit
# are kept: uv prefers the versions already in each output file. To move packages, pass uv's flags:
#   requirements/compile.sh --upgrade-package aiohttp     # one package (and what it needs)
#   requirements/compile.sh --upgrade                     # everything
# then reinstall (`make install`) and run the tests. UV=/path/to/uv picks the uv binary.
set -euo pipefail
cd "$(dirname "$0")/.."

uv=${UV:-uv}
# --universal: one lock for Linux images and CI and for macOS laptops (platform markers kept).
common=(--quiet --generate-hashes --universal --python-version 3.11
        --custom-compile-command "requirements/compile.sh")

# dev.txt first: everything CI and `make install` install (the services, the worker, the dev and
# bench tools). The other locks are held to its versions, so a package has one version everywhere.
"$uv" pip compile pyproject.toml --extra dev --extra bench --extra worker "${common[@]}" "$@" \
    -o requirements/dev.txt
"$uv" pip compile pyproject.toml "${common[@]}" -c requirements/dev.txt -o requirements/service.txt
"$uv" pip compile worker/requirements.in "${common[@]}" -c requirements/dev.txt -o worker/requirements.txt
"$uv" pip compile requirements/emulators.in "${common[@]}" -c requirements/dev.txt \
    -o requirements/emulators.txt
