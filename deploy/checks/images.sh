#!/usr/bin/env bash
# The container files, checked without a Docker engine:
#   1. docker-compose.yml against the Compose specification (check-jsonschema's copy of the
#      compose-spec schema): unknown keys, wrong types, malformed ports and healthchecks;
#   2. hadolint on every Dockerfile, failing on any finding, style included; no .hadolint.yaml, so
#      no rule is ignored;
#   3. checkov (framework dockerfile) on every Dockerfile, failing on any failed check; its settings,
#      and the reason for any skip (none today), are in deploy/checks/checkov-dockerfile.yaml.
# The Dockerfiles are found, not listed: a new one is checked too. The rules a schema cannot see
# (digest pins, no default secrets, ports on 127.0.0.1, ...) are tests/test_compose_file.py's.
# The tools come from ${CHECKS_BIN:-.venv-checks/bin}: check-jsonschema, hadolint, checkov.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=${CHECKS_BIN:-.venv-checks/bin}
for tool in check-jsonschema hadolint checkov; do
    if [ ! -x "$bin/$tool" ]; then
        echo "images.sh: $bin/$tool is missing (CHECKS_BIN names the tools' bin folder)" >&2
        exit 2
    fi
done

# 1. The Compose file.
"$bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

# Every Dockerfile of the repository, virtualenvs and git's own files aside.
mapfile -t dockerfiles < <(
    find . \( -path ./.git -o -path './.venv*' -o -name node_modules \) -prune -o \
        -type f \( -name Dockerfile -o -name '*.Dockerfile' \) -print | sed 's|^\./||' | sort
)
if [ "${#dockerfiles[@]}" -eq 0 ]; then
    echo "images.sh: no Dockerfile found" >&2
    exit 1
fi

# 2. hadolint.
for dockerfile in "${dockerfiles[@]}"; do
    "$bin/hadolint" --failure-threshold style "$dockerfile"
    echo "hadolint: $dockerfile clean"
done

# 3. checkov.
for dockerfile in "${dockerfiles[@]}"; do
    echo "checkov: $dockerfile"
    "$bin/checkov" --config-file deploy/checks/checkov-dockerfile.yaml -f "$dockerfile"
done
echo "docker-compose.yml and ${#dockerfiles[@]} Dockerfiles: all checks passed"
