"""Helper of scripts/focus-validate.sh: combine billsync's FOCUS batch files into one table,
check what focus-validator does not, and write it typed for the validator.

  focus_check.py combine DIR OUT.csv OUT.parquet [--drop COLUMN]
  focus_check.py report REPORT.xml   (focus-validator's --output-type unittest report)

`report` prints one line: rules run, passed, failed (with errors), skipped, then the names of
the failed and skipped rules; exit 0 when no rule failed or errored, else 1.

Why a typed Parquet copy: focus-validator 1.0.0 reads CSV with pandas' type guessing, so an
id column holding only digits ("1", "1234") becomes an integer column and fails the
validator's "is a string" rule although FOCUS ids are strings. The Parquet copy carries the
FOCUS types (decimal columns as numbers, everything else as text, empty = null), which is how
any FOCUS consumer reads the CSV; the values are the CSV's, untouched.

Why four columns are renamed in that copy: the export names every column as FOCUS 1.0 does
(ProviderName, PublisherName, InvoiceIssuerName, ResourceId), but focus-validator 1.0.0's
"1.0" rule set still looks them up under their 1.0-preview names (Provider, Publisher,
InvoiceIssuer, ResourceID). The copy carries those four under the names the validator looks
for, so its rules check their values; nothing else is renamed.

Checks done here (exit 1 on a failure): every file has the same header; every FOCUS 1.0
Mandatory column is there under its 1.0 name, and no 1.0-preview name is; `x_` columns come
after all FOCUS columns; decimal columns parse as exact decimals; date-times are UTC ISO 8601
with `Z`; ChargePeriodStart < ChargePeriodEnd; the billing period contains ChargePeriodStart;
ChargeCategory and ChargeClass take FOCUS values; no idempotency key appears twice. It also
counts the rows the skipped validator rule is about (SkuPriceId null on a Usage row that is
not a correction) and prints that count.
"""

import csv
import datetime as dt
import xml.etree.ElementTree as ET
import decimal
import pathlib
import sys

import pyarrow as pa
import pyarrow.parquet as pq

DECIMAL_COLUMNS = {
    "BilledCost",
    "ConsumedQuantity",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "ListCost",
    "ListUnitPrice",
    "PricingQuantity",
}
DATETIME_COLUMNS = {"BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd"}
CHARGE_CATEGORIES = {"Usage", "Purchase", "Tax", "Credit", "Adjustment"}
# FOCUS 1.0, specification/columns/*.md with "Feature level: Mandatory", by column ID.
MANDATORY_1_0 = [
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency",
    "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory", "ChargeClass",
    "ChargeDescription", "ChargePeriodEnd", "ChargePeriodStart", "ContractedCost",
    "EffectiveCost", "InvoiceIssuerName", "ListCost", "PricingQuantity", "PricingUnit",
    "ProviderName", "PublisherName", "ServiceCategory", "ServiceName",
]
# FOCUS 1.0 column ID -> the name focus-validator 1.0.0 looks up in its 1.0 rules.
VALIDATOR_NAMES = {
    "ProviderName": "Provider",
    "PublisherName": "Publisher",
    "InvoiceIssuerName": "InvoiceIssuer",
    "ResourceId": "ResourceID",
}


def utc(value, where):
    if not value.endswith("Z"):
        raise ValueError(f"{where}: {value!r} is not UTC ISO 8601 ending in Z")
    parsed = dt.datetime.fromisoformat(value[:-1] + "+00:00")
    if parsed.utcoffset() != dt.timedelta(0):
        raise ValueError(f"{where}: {value!r} is not UTC")
    return parsed


def combine(directory, out_csv, out_parquet, drop=None):
    files = sorted(pathlib.Path(directory).glob("*.csv"))
    if not files:
        raise ValueError(f"no CSV files in {directory}")
    header = None
    rows = []
    for f in files:
        with open(f, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            h = next(reader)
            if header is None:
                header = h
            elif h != header:
                raise ValueError(f"{f.name}: header differs from {files[0].name}")
            for n, row in enumerate(reader, start=2):
                if len(row) != len(header):
                    raise ValueError(f"{f.name}:{n}: {len(row)} fields, header has {len(header)}")
                rows.append((f"{f.name}:{n}", row))
    missing = [c for c in MANDATORY_1_0 if c not in header]
    if missing:
        raise ValueError(f"FOCUS 1.0 Mandatory columns missing: {', '.join(missing)}")
    preview = [c for c in VALIDATOR_NAMES.values() if c in header]
    if preview:
        raise ValueError(f"1.0-preview column names instead of FOCUS 1.0 ones: {', '.join(preview)}")
    first_extra = next((i for i, c in enumerate(header) if c.startswith("x_")), len(header))
    if any(not c.startswith("x_") for c in header[first_extra:]):
        raise ValueError("a FOCUS column comes after an x_ column")
    col = {c: i for i, c in enumerate(header)}
    keys = set()
    sku_price_null = 0
    for where, row in rows:
        if (row[col["ChargeCategory"]] == "Usage" and row[col["ChargeClass"]] != "Correction"
                and row[col["SkuPriceId"]] == ""):
            sku_price_null += 1
        for c in DECIMAL_COLUMNS & col.keys():
            if row[col[c]] != "":
                decimal.Decimal(row[col[c]])
        times = {c: utc(row[col[c]], f"{where} {c}") for c in DATETIME_COLUMNS & col.keys()}
        if times["ChargePeriodStart"] >= times["ChargePeriodEnd"]:
            raise ValueError(f"{where}: ChargePeriodStart is not before ChargePeriodEnd")
        if not times["BillingPeriodStart"] <= times["ChargePeriodStart"] < times["BillingPeriodEnd"]:
            raise ValueError(f"{where}: ChargePeriodStart is outside the billing period")
        if row[col["ChargeCategory"]] not in CHARGE_CATEGORIES:
            raise ValueError(f"{where}: ChargeCategory {row[col['ChargeCategory']]!r}")
        if row[col["ChargeClass"]] not in ("", "Correction"):
            raise ValueError(f"{where}: ChargeClass {row[col['ChargeClass']]!r}")
        key = row[col["x_IdempotencyKey"]]
        if key in keys:
            raise ValueError(f"{where}: key {key} appears twice")
        keys.add(key)

    keep = [c for c in header if c != drop]
    with open(out_csv, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(keep)
        for _, row in rows:
            w.writerow([row[col[c]] for c in keep])
    arrays = {}
    for c in keep:
        values = [row[col[c]] for _, row in rows]
        if c in DECIMAL_COLUMNS:
            arrays[c] = pa.array([float(v) if v != "" else None for v in values], pa.float64())
        else:
            arrays[c] = pa.array([v if v != "" else None for v in values], pa.string())
    arrays = {VALIDATOR_NAMES.get(c, c): a for c, a in arrays.items()}
    pq.write_table(pa.table(arrays), out_parquet)
    print(f"focus: {len(rows)} rows from {len(files)} files, {len(keep)} columns")
    print(f"focus: SkuPriceId is null on {sku_price_null} of {len(rows)} rows that are Usage "
          "and not a correction (no price-list ids; the skipped rule SkuPriceId_Nullable)")


def report(path):
    root = ET.parse(path).getroot()
    failed, skipped, total = [], [], 0
    for case in root.iter("testcase"):
        total += 1
        rule = case.get("name", "").split(" :: ")[0]
        for child in case:
            if child.tag in ("failure", "error"):
                failed.append(rule)
            elif child.tag == "skipped":
                skipped.append(rule)
    passed = total - len(failed) - len(skipped)
    print(f"rules {total}, passed {passed}, failed {len(failed)}, skipped {len(skipped)}"
          f"; failed: {' '.join(failed) or '-'}; skipped: {' '.join(skipped) or '-'}")
    return 0 if total > 0 and not failed else 1


def main(argv):
    if len(argv) == 3 and argv[1] == "report":
        return report(argv[2])
    if len(argv) < 5 or argv[1] != "combine":
        print(__doc__, file=sys.stderr)
        return 2
    drop = None
    if len(argv) == 7 and argv[5] == "--drop":
        drop = argv[6]
    try:
        combine(argv[2], argv[3], argv[4], drop)
    except (ValueError, KeyError, decimal.InvalidOperation) as e:
        print(f"focus: check failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
