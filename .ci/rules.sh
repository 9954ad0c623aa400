#!/usr/bin/env bash
# gpuwatch's alert rules: `promtool check rules` on the plain rules file,
# the unit tests of tests/prometheus/*.test.yml (`promtool test rules`: each
# alert fires when it should and stays silent when it should not), and the
# PrometheusRule manifest checked against the rules file it is generated
# from (.ci/rules_sync.py), so the two cannot drift.
#
# Needs: promtool (Debian's `prometheus` package) and python3 with PyYAML
# (`python3-yaml`); whatever is missing is installed with apt-get. Run from
# the repository root; takes a few seconds.
set -euo pipefail

say() { printf 'rules.sh: %s\n' "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v promtool >/dev/null || missing+=(prometheus)
python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

RULES=deploy/prometheus/gpuwatch-rules.yml
timeout 60 promtool check rules "$RULES" || die "promtool check rules $RULES"
tests=(tests/prometheus/*.test.yml)
[ -e "${tests[0]}" ] || die "no rule unit tests under tests/prometheus/"
timeout 120 promtool test rules "${tests[@]}" || die "promtool test rules ${tests[*]}"
timeout 30 python3 .ci/rules_sync.py --check || die "the PrometheusRule manifest and $RULES differ"
say "PASS: rules checked, unit-tested, and the PrometheusRule matches them"
