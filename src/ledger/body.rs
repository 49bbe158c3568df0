//! How a normalized record is stored in `record_bodies.record`.
//!
//! A record's JSON (with the provider's raw fields) is ~1.4 KB, several times the rest of its
//! row: written as is it made staging and acknowledging disk-bound (one record per 4 KB page).
//! Bodies are therefore LZ4-compressed against a fixed dictionary of typical records, which
//! takes them to a few hundred bytes at a few microseconds each.
//!
//! Format, told apart by the first byte:
//! - `{` — plain JSON (bodies written before compression existed, migrated as they were);
//! - `0x01` — LZ4 block with its decompressed size prepended, dictionary [`DICT_V1`] (what
//!   every body was written as until per-provider dictionaries; still written for a record of
//!   a provider without one);
//! - `0x02`–`0x05` — the same, the dictionary being the one line of `DICT_V1` that is a record
//!   of the body's own provider (MetalSoft, SoftLayer, SAKURA Cloud, Jelastic).
//!
//! Why one line rather than the whole: LZ4 indexes its whole dictionary before every block,
//! so a 7 KB dictionary cost more than compressing the ~1.3 KB record itself; the record's
//! own provider's line is what its matches come from anyway. Measured on 10,983 generated
//! MetalSoft records: 1.42 µs and 350 bytes per body against 2.63 µs and 414 bytes.
//!
//! `DICT_V1` must never change: every stored body needs exactly its bytes to decompress. A
//! better dictionary gets a new tag, and all stay readable.

use crate::record::UsageRecord;

/// Tag of an LZ4 body compressed with [`DICT_V1`].
const LZ4_DICT_V1: u8 = 0x01;

/// Typical records of the four providers (field names, value shapes), one JSON line each, in
/// the order of [`PROVIDER_DICTS`]: the LZ4 dictionary.
const DICT_V1: &[u8] = include_bytes!("body_dict_v1.json");

/// Tag, provider and dictionary (its line of [`DICT_V1`]) of the per-provider formats.
const PROVIDER_DICTS: [(u8, &str, &[u8]); 4] = [
    (0x02, "metalsoft", dict_line(0)),
    (0x03, "softlayer", dict_line(1)),
    (0x04, "sakura", dict_line(2)),
    (0x05, "jelastic", dict_line(3)),
];

/// Line `n` of [`DICT_V1`], without its newline (a compile error if there is none).
const fn dict_line(n: usize) -> &'static [u8] {
    let mut rest = DICT_V1;
    let mut line = 0;
    loop {
        let mut end = 0;
        while end < rest.len() && rest[end] != b'\n' {
            end += 1;
        }
        let (this, after) = rest.split_at(end);
        if line == n {
            assert!(!this.is_empty(), "DICT_V1 has no such line");
            return this;
        }
        assert!(!after.is_empty(), "DICT_V1 has no such line");
        rest = after.split_at(1).1;
        line += 1;
    }
}

/// The tag and dictionary a record of `provider` is compressed with.
fn dictionary_for(provider: &str) -> (u8, &'static [u8]) {
    PROVIDER_DICTS
        .iter()
        .find(|(_, name, _)| *name == provider)
        .map_or((LZ4_DICT_V1, DICT_V1), |&(tag, _, dict)| (tag, dict))
}

/// The dictionary of a stored body's tag, if the tag is an LZ4 one.
fn dictionary_of(tag: u8) -> Option<&'static [u8]> {
    if tag == LZ4_DICT_V1 {
        return Some(DICT_V1);
    }
    PROVIDER_DICTS
        .iter()
        .find(|(t, _, _)| *t == tag)
        .map(|&(_, _, dict)| dict)
}

/// Decompressed bodies larger than this are refused as corrupt (no record comes close).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Scratch buffers kept by each thread that encodes bodies larger than this are given back.
const KEEP_SCRATCH: usize = 64 * 1024;

thread_local! {
    /// The JSON and the compressed block of the record being encoded: reused, so encoding a
    /// record allocates only its result (growing fresh buffers per record showed up as a tenth
    /// of the puller's time in `malloc`/`memmove`).
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// Encode a record for storage: the tag, the JSON's length (u32, little-endian) and the LZ4
/// block, i.e. what `compress_prepend_size_with_dict` writes, behind the tag.
pub fn encode(record: &UsageRecord) -> Result<Vec<u8>, String> {
    let (tag, dict) = dictionary_for(&record.provider);
    SCRATCH.with_borrow_mut(|(json, block)| {
        json.clear();
        serde_json::to_writer(&mut *json, record).map_err(|e| e.to_string())?;
        let size = u32::try_from(json.len()).map_err(|_| "record too large".to_string())?;
        let max = lz4_flex::block::get_maximum_output_size(json.len());
        if block.len() < max {
            block.resize(max, 0);
        }
        let n = lz4_flex::block::compress_into_with_dict(json, block, dict)
            .map_err(|e| format!("cannot compress the record body: {e}"))?;
        let mut out = Vec::with_capacity(1 + 4 + n);
        out.push(tag);
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&block[..n]);
        if json.capacity() > KEEP_SCRATCH || block.capacity() > KEEP_SCRATCH {
            *json = Vec::new();
            *block = Vec::new();
        }
        Ok(out)
    })
}

/// Decode a stored body (either format).
pub fn decode(body: &[u8]) -> Result<UsageRecord, String> {
    match body.first() {
        None => Err("the record body is empty (pruned by `ledger vacuum`)".into()),
        Some(b'{') => serde_json::from_slice(body).map_err(|e| e.to_string()),
        Some(&tag) => {
            let dict = dictionary_of(tag)
                .ok_or_else(|| format!("unknown record body format 0x{tag:02x}"))?;
            let rest = &body[1..];
            let size = rest
                .get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or("truncated compressed body")?;
            if size > MAX_BODY {
                return Err(format!("compressed body claims {size} bytes"));
            }
            let json = lz4_flex::block::decompress_size_prepended_with_dict(rest, dict)
                .map_err(|e| format!("cannot decompress the record body: {e}"))?;
            serde_json::from_slice(&json).map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The records of `DICT_V1`, one per provider.
    fn samples() -> Vec<UsageRecord> {
        std::str::from_utf8(DICT_V1)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    fn sample() -> UsageRecord {
        samples().remove(0)
    }

    #[test]
    fn each_provider_dictionary_is_that_providers_line() {
        let samples = samples();
        assert_eq!(samples.len(), PROVIDER_DICTS.len());
        for ((tag, provider, dict), record) in PROVIDER_DICTS.iter().zip(&samples) {
            assert_eq!(record.provider, *provider, "tag 0x{tag:02x}");
            let line: UsageRecord = serde_json::from_slice(dict).unwrap();
            assert_eq!(line.provider, *provider);
            assert!(dict.len() > 1000 && !dict.contains(&b'\n'));
        }
    }

    #[test]
    fn writes_exactly_the_prepend_size_format() {
        let mut other = sample();
        other.provider = "somecloud".into();
        let mut cases: Vec<(UsageRecord, u8, &[u8])> = samples()
            .into_iter()
            .zip(PROVIDER_DICTS)
            .map(|(r, (tag, _, dict))| (r, tag, dict))
            .collect();
        cases.push((other, LZ4_DICT_V1, DICT_V1));
        for (r, tag, dict) in cases {
            let json = serde_json::to_vec(&r).unwrap();
            let mut expected = vec![tag];
            expected.extend(lz4_flex::block::compress_prepend_size_with_dict(
                &json, dict,
            ));
            // Twice: the second encoding reuses the scratch buffers of the first.
            assert_eq!(encode(&r).unwrap(), expected, "{}", r.provider);
            assert_eq!(encode(&r).unwrap(), expected, "{}", r.provider);
        }
    }

    #[test]
    fn round_trips_and_is_small() {
        for mut r in samples() {
            r.resource_id = "drive:42".into();
            let body = encode(&r).unwrap();
            let json = serde_json::to_vec(&r).unwrap();
            assert!(
                body.len() * 3 < json.len(),
                "{}: {} bytes for {} of JSON",
                r.provider,
                body.len(),
                json.len()
            );
            assert_eq!(
                serde_json::to_value(decode(&body).unwrap()).unwrap(),
                serde_json::to_value(&r).unwrap()
            );
        }
    }

    #[test]
    fn bodies_compressed_with_the_whole_dictionary_still_read() {
        for r in samples() {
            let json = serde_json::to_vec(&r).unwrap();
            let mut body = vec![LZ4_DICT_V1];
            body.extend(lz4_flex::block::compress_prepend_size_with_dict(
                &json, DICT_V1,
            ));
            assert_eq!(
                serde_json::to_value(decode(&body).unwrap()).unwrap(),
                serde_json::to_value(&r).unwrap()
            );
            // A body read with another tag's dictionary is not silently taken for the record.
            body[0] = if r.provider == "metalsoft" {
                0x03
            } else {
                0x02
            };
            assert!(
                decode(&body).map_or(true, |other| serde_json::to_value(other).unwrap()
                    != serde_json::to_value(&r).unwrap())
            );
        }
    }

    #[test]
    fn plain_json_bodies_still_read() {
        let r = sample();
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(decode(&json).unwrap().resource_id, r.resource_id);
    }

    #[test]
    fn corrupt_bodies_are_errors_not_panics() {
        assert!(decode(&[]).unwrap_err().contains("pruned"));
        assert!(decode(&[0x01, 0xff]).is_err());
        assert!(decode(&[0x01, 0xff, 0xff, 0xff, 0x7f, 0]).is_err());
        assert!(decode(&[0x07]).unwrap_err().contains("0x07"));
        let mut body = encode(&sample()).unwrap();
        body.truncate(body.len() / 2);
        assert!(decode(&body).is_err());
    }
}
