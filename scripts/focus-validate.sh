#!/usr/bin/env bash
# Validate billsync's FOCUS export of the demo data with the FinOps Foundation's validator
# (PyPI focus-validator 1.0.0, the only release; `--validate-version 1.0`), offline after the
# first run:
#   1. a cached venv with pinned versions (a stamp file: the second run skips pip);
#   2. the FOCUS export of the demo data, written by the ignored test
#      `sink_files::focus_export_of_the_demo` (all four providers, the example mappings, the
#      FOCUS sink as the only sink) into a temporary directory;
#   3. scripts/focus_check.py combines the batch files, checks what the validator does not
#      (FOCUS 1.0 column IDs, header order, UTC times, periods, exact decimals, no duplicate
#      key) and writes a typed Parquet copy for the validator (see that file for why, and why
#      four columns carry the 1.0-preview names the validator looks up);
#   4. focus-validator on it, with its JUnit report: no rule may fail or error, and the only
#      skipped rule must be the one below;
#   5. two controls that must fail: BilledCost removed (BilledCost_Required) and ProviderName
#      removed (Provider_Required: the renamed columns do reach the validator's rules).
# One rule is skipped (focus-validate.override.yaml): SkuPriceId_Nullable of the validator's
# 1.0 rule set queries `ChargeType`, the pre-1.0 name of ChargeCategory, so it errors on any
# FOCUS 1.0 file. Its intent (SkuPriceId not null on Usage rows that are not corrections) is
# not met by billsync, which reads no price-list ids: focus_check.py prints the count.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

REQUIREMENTS="focus-validator==1.0.0 multimethod==1.12 pandas==2.3.3 pandera==0.17.2 pandasql==0.7.3 numpy==1.26.4 pyarrow==18.1.0 pydantic==2.14.4 sqlglot==18.17.0 SQLAlchemy==2.1.9 PyYAML==6.0.4 requests==2.34.2 tabulate==0.10.0"
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/billsync-focus-venv"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/billsync-target}"

stamp="$VENV/.billsync-requirements"
if [[ ! -x "$VENV/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$REQUIREMENTS" ]]; then
  echo "focus: creating $VENV ($REQUIREMENTS)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check $REQUIREMENTS
  echo "$REQUIREMENTS" >"$stamp"
fi
py="$VENV/bin/python"
validator="$VENV/bin/focus-validator"
# The validator opens its currency list by a path relative to the working directory.
site=$("$py" -c 'import os, focus_validator; print(os.path.dirname(os.path.dirname(focus_validator.__file__)))')

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "focus: exporting the demo data"
BILLSYNC_FOCUS_OUT="$work/export" cargo test --locked --quiet --test sink_files \
  focus_export_of_the_demo -- --ignored --exact 2>&1 | tail -n 3

"$py" scripts/focus_check.py combine "$work/export" "$work/focus.csv" "$work/focus.parquet"
"$py" scripts/focus_check.py combine "$work/export" "$work/no-cost.csv" "$work/no-cost.parquet" \
  --drop BilledCost >/dev/null
"$py" scripts/focus_check.py combine "$work/export" "$work/no-provider.csv" \
  "$work/no-provider.parquet" --drop ProviderName >/dev/null

validate() { # parquet file → the rule summary of focus_check.py report (exit 1: a rule failed)
  local report="${1%.parquet}.xml"
  (cd "$site" && "$validator" --data-file "$1" --validate-version 1.0 \
    --override-file "$root/scripts/focus-validate.override.yaml" \
    --output-type unittest --output-destination "$report" >"$work/validator.log" 2>&1) || true
  if [[ ! -s "$report" ]]; then
    cat "$work/validator.log"
    echo "focus: FAILED: focus-validator wrote no report for $1"
    return 2
  fi
  "$py" "$root/scripts/focus_check.py" report "$report"
}

if ! out=$(validate "$work/focus.parquet"); then
  echo "$out"
  echo "focus: FAILED: the demo export does not pass focus-validator 1.0.0 (FOCUS 1.0)"
  exit 1
fi
if ! grep -q "; skipped: SkuPriceId_Nullable$" <<<"$out"; then
  echo "$out"
  echo "focus: FAILED: expected exactly one skipped rule, SkuPriceId_Nullable"
  exit 1
fi
echo "focus: focus-validator 1.0.0, FOCUS 1.0: $out"

for control in "no-cost:BilledCost_Required" "no-provider:Provider_Required"; do
  file=${control%%:*} rule=${control#*:}
  out=$(validate "$work/$file.parquet") && {
    echo "$out"
    echo "focus: FAILED: the control $file passed; the check cannot be trusted"
    exit 1
  }
  if ! grep -q "failed: .*\b$rule\b" <<<"$out"; then
    echo "$out"
    echo "focus: FAILED: the control $file did not fail $rule"
    exit 1
  fi
  echo "focus: control $file: refused by $rule as expected"
done
