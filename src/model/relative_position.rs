//! DeBERTa-v2's relative positions: the distance between a query and a key, log-bucketed
//! past a middle range, and the rows of the relative-embedding table its content->position
//! (c2p) and position->content (p2c) terms read, as transformers' modeling_deberta_v2
//! computes them.

use candle_core::{Device, Result, Tensor};

/// How distances map to rows of the relative-embedding table (`2 * span` rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelativePositions {
    /// Half the table: `position_buckets` when bucketed, else `max_relative_positions`.
    span: i64,
    /// `position_buckets` and `max_relative_positions`: log buckets when both are positive.
    buckets: i64,
    max_position: i64,
}

impl RelativePositions {
    pub fn new(buckets: i64, max_position: i64) -> Self {
        let span = if buckets > 0 { buckets } else { max_position };
        Self {
            span,
            buckets,
            max_position,
        }
    }

    /// Rows of the relative-embedding table the attention reads.
    pub fn table_rows(&self) -> usize {
        2 * self.span.max(0) as usize
    }

    /// The (bucketed) relative position of key `k` seen from query `q`.
    fn position(&self, q: usize, k: usize) -> i64 {
        let distance = q as i64 - k as i64;
        if self.buckets > 0 && self.max_position > 0 {
            log_bucket(distance, self.buckets, self.max_position)
        } else {
            distance
        }
    }

    fn clamp(&self, row: i64) -> u32 {
        row.clamp(0, 2 * self.span - 1) as u32
    }

    /// Table row of the c2p term of (query q, key k): query q's projection onto the key
    /// side of the table, at the distance q - k.
    fn c2p_row(&self, q: usize, k: usize) -> u32 {
        self.clamp(self.position(q, k) + self.span)
    }

    /// Table row of the p2c term of (query q, key k): transformers gathers it along the key
    /// axis at -position(k, q) and transposes.
    fn p2c_row(&self, q: usize, k: usize) -> u32 {
        self.clamp(self.span - self.position(k, q))
    }

    /// Flat indices for the first `queries` queries over `keys` keys: picking them from
    /// `[.., queries * 2 span]` c2p products (query-major) and `[.., keys * 2 span]` p2c
    /// products (key-major) gives both terms as `[.., queries * keys]`.
    pub fn gather_indices(
        &self,
        queries: usize,
        keys: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let rows = self.table_rows() as u32;
        let mut c2p = Vec::with_capacity(queries * keys);
        let mut p2c = Vec::with_capacity(queries * keys);
        for q in 0..queries {
            for k in 0..keys {
                c2p.push(q as u32 * rows + self.c2p_row(q, k));
                p2c.push(k as u32 * rows + self.p2c_row(q, k));
            }
        }
        Ok((
            Tensor::from_vec(c2p, queries * keys, device)?,
            Tensor::from_vec(p2c, queries * keys, device)?,
        ))
    }
}

/// transformers' `make_log_bucket_position` for one distance: exact below `buckets / 2`,
/// then `ceil(ln(|d| / mid) / ln((max - 1) / mid) * (mid - 1)) + mid` with the sign of
/// d, in f32 as torch computes it (the ceil makes the precision part of the result).
pub fn log_bucket(distance: i64, buckets: i64, max_position: i64) -> i64 {
    let mid = buckets / 2;
    let magnitude = distance.abs();
    if magnitude <= mid {
        return distance;
    }
    let ratio = ((max_position - 1) as f64 / mid as f64) as f32;
    let scaled = (magnitude as f32 / mid as f32).ln() / ratio.ln() * (mid - 1) as f32;
    (scaled.ceil() + mid as f32) as i64 * distance.signum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every distance of the tables transformers' own function produced for the
    /// deberta-v2-conv fixture (deberta-v3's 256 buckets over 512, and 8 over 64).
    #[test]
    fn log_buckets_match_transformers() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/expected/deberta-v2-conv.json"
        );
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let tables = expected["log_buckets"].as_array().unwrap();
        assert_eq!(tables.len(), 2);
        for table in tables {
            let buckets = table["bucket_size"].as_i64().unwrap();
            let max = table["max_position"].as_i64().unwrap();
            let from = table["from"].as_i64().unwrap();
            let want = table["buckets"].as_array().unwrap();
            let mut log_range = 0;
            for (i, w) in want.iter().enumerate() {
                let d = from + i as i64;
                assert_eq!(log_bucket(d, buckets, max), w.as_i64().unwrap(), "d {d}");
                log_range += usize::from(d.abs() > buckets / 2);
            }
            assert!(
                log_range > want.len() / 2,
                "the table reaches the log range"
            );
        }
    }

    /// The two terms read the same row for a pair (distances are odd-symmetric), and the
    /// flat indices address the rows of their own query (c2p) or key (p2c).
    #[test]
    fn gather_indices_address_query_and_key_rows() {
        let positions = RelativePositions::new(4, 16);
        assert_eq!(positions.table_rows(), 8);
        let (queries, keys) = (3, 40);
        let (c2p, p2c) = positions
            .gather_indices(queries, keys, &Device::Cpu)
            .unwrap();
        let (c2p, p2c) = (c2p.to_vec1::<u32>().unwrap(), p2c.to_vec1::<u32>().unwrap());
        for q in 0..queries {
            for k in 0..keys {
                let row = positions.c2p_row(q, k);
                assert_eq!(row, positions.p2c_row(q, k));
                assert_eq!(c2p[q * keys + k], q as u32 * 8 + row);
                assert_eq!(p2c[q * keys + k], k as u32 * 8 + row);
            }
        }
        // Far keys clamp to the table's first row; the query itself reads the middle.
        assert_eq!(positions.c2p_row(0, 39), 0);
        assert_eq!(positions.c2p_row(2, 2), 4);
        // Unbucketed: plain distances, clamped to the table.
        let plain = RelativePositions::new(-1, 3);
        assert_eq!(plain.table_rows(), 6);
        assert_eq!(plain.c2p_row(5, 0), 5);
        assert_eq!(plain.c2p_row(1, 0), 4);
        assert_eq!(plain.c2p_row(0, 9), 0);
    }
}
