#!/usr/bin/env bash
# Build the megatron-ext image from the checkout this script is in (docs/DOCKER.md).
#
#   bash docker/build.sh                      # tags megatron-ext:latest
#   IMAGE=registry.example.com/me/megatron-ext:v1 bash docker/build.sh --pull
#
# Extra arguments go to `docker build`.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${IMAGE:-megatron-ext:latest}

docker build --file "$repo/docker/Dockerfile" --tag "$image" "$@" "$repo"
echo "built $image"
