#!/usr/bin/env bash
# On the GPU machine: every GPU test, then the kernel benchmark (see device_check.sh).
# Usage: bash .ci/device_final.sh
exec bash "$(dirname "$0")/device_check.sh" tests kernels
