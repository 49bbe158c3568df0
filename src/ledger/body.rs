//! How a normalized record is stored in `record_bodies.record`.
//!
//! A record's JSON (with the provider's raw fields) is ~1.4 KB, several times the rest of its
//! row: written as is it made staging and acknowledging disk-bound (one record per 4 KB page).
//! Bodies are therefore LZ4-compressed against a fixed dictionary of typical records, which
//! takes them to a few hundred bytes at a few microseconds each.
//!
//! Format, told apart by the first byte:
//! - `{` — plain JSON (bodies written before compression existed, migrated as they were);
//! - `0x01` — LZ4 block with its decompressed size prepended, dictionary [`DICT_V1`].
//!
//! `DICT_V1` must never change: every stored `0x01` body needs exactly these bytes to
//! decompress. A better dictionary gets a new tag (`0x02`), and both stay readable.

use crate::record::UsageRecord;

/// Tag of an LZ4 body compressed with [`DICT_V1`].
const LZ4_DICT_V1: u8 = 0x01;

/// Typical records of the four providers (field names, value shapes): the LZ4 dictionary.
const DICT_V1: &[u8] = include_bytes!("body_dict_v1.json");

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
    SCRATCH.with_borrow_mut(|(json, block)| {
        json.clear();
        serde_json::to_writer(&mut *json, record).map_err(|e| e.to_string())?;
        let size = u32::try_from(json.len()).map_err(|_| "record too large".to_string())?;
        let max = lz4_flex::block::get_maximum_output_size(json.len());
        if block.len() < max {
            block.resize(max, 0);
        }
        let n = lz4_flex::block::compress_into_with_dict(json, block, DICT_V1)
            .map_err(|e| format!("cannot compress the record body: {e}"))?;
        let mut out = Vec::with_capacity(1 + 4 + n);
        out.push(LZ4_DICT_V1);
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
        Some(&LZ4_DICT_V1) => {
            let rest = &body[1..];
            let size = rest
                .get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or("truncated compressed body")?;
            if size > MAX_BODY {
                return Err(format!("compressed body claims {size} bytes"));
            }
            let json = lz4_flex::block::decompress_size_prepended_with_dict(rest, DICT_V1)
                .map_err(|e| format!("cannot decompress the record body: {e}"))?;
            serde_json::from_slice(&json).map_err(|e| e.to_string())
        }
        Some(other) => Err(format!("unknown record body format 0x{other:02x}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> UsageRecord {
        let line = std::str::from_utf8(DICT_V1)
            .unwrap()
            .lines()
            .next()
            .unwrap();
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn writes_exactly_the_prepend_size_format() {
        let r = sample();
        let json = serde_json::to_vec(&r).unwrap();
        let mut expected = vec![LZ4_DICT_V1];
        expected.extend(lz4_flex::block::compress_prepend_size_with_dict(
            &json, DICT_V1,
        ));
        // Twice: the second encoding reuses the scratch buffers of the first.
        assert_eq!(encode(&r).unwrap(), expected);
        assert_eq!(encode(&r).unwrap(), expected);
    }

    #[test]
    fn round_trips_and_is_small() {
        let mut r = sample();
        r.resource_id = "drive:42".into();
        let body = encode(&r).unwrap();
        let json = serde_json::to_vec(&r).unwrap();
        assert!(
            body.len() * 3 < json.len(),
            "{} bytes for {} of JSON",
            body.len(),
            json.len()
        );
        assert_eq!(
            serde_json::to_value(decode(&body).unwrap()).unwrap(),
            serde_json::to_value(&r).unwrap()
        );
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
