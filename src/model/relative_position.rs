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

    /// The (bucketed) relative position at `distance` = query - key.
    fn bucketed(&self, distance: i64) -> i64 {
        if self.buckets > 0 && self.max_position > 0 {
            log_bucket(distance, self.buckets, self.max_position)
        } else {
            distance
        }
    }

    /// Table row of the c2p term at `distance` = query - key: the query's projection onto
    /// the key side of the table. The p2c term reads the same row (see [`Self::p2c_row`]).
    fn row_at(&self, distance: i64) -> u32 {
        (self.bucketed(distance) + self.span).clamp(0, 2 * self.span - 1) as u32
    }

    /// Table row of the p2c term of (query q, key k) as transformers computes it: gathered
    /// along the key axis at -position(k, q), then transposed. Buckets are odd-symmetric,
    /// so this is `row_at(q - k)`: both terms read one row per pair.
    #[cfg(test)]
    fn p2c_row(&self, q: usize, k: usize) -> u32 {
        let position = self.bucketed(k as i64 - q as i64);
        (self.span - position).clamp(0, 2 * self.span - 1) as u32
    }

    /// The rows inputs of at most `len` tokens can read: distances -(len - 1)..=len - 1.
    pub fn window(&self, len: usize) -> RelativeWindow {
        let reach = len.max(1) as i64 - 1;
        let rows: Vec<u32> = (-reach..=reach).map(|d| self.row_at(d)).collect();
        let first = rows.iter().copied().min().unwrap_or(0);
        let last = rows.iter().copied().max().unwrap_or(0);
        RelativeWindow {
            first_row: first as usize,
            rows: (last - first) as usize + 1,
            by_distance: rows.iter().map(|r| r - first).collect(),
            reach: reach as usize,
        }
    }
}

/// The part of the relative table a batch reads (rows `first_row..first_row + rows`;
/// inputs shorter than the table's span read fewer than all of it), and each distance's
/// row within that part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelativeWindow {
    pub first_row: usize,
    pub rows: usize,
    /// Row (from `first_row`) of distance q - k, at index q - k + reach.
    by_distance: Vec<u32>,
    reach: usize,
}

impl RelativeWindow {
    /// The row (from `first_row`) both terms read for query position `q` and key `k`.
    #[inline(always)]
    pub fn row(&self, q: usize, k: usize) -> u32 {
        self.by_distance[q + self.reach - k]
    }

    /// Whether every pair of positions of an input of `len` tokens has its row here.
    pub fn covers(&self, len: usize) -> bool {
        len <= self.reach + 1
    }

    /// Flat indices for the first `queries` queries over `keys` keys: picking them from
    /// `[.., queries * rows]` c2p products (query-major) and `[.., keys * rows]` p2c
    /// products (key-major) gives both terms as `[.., queries * keys]`.
    pub fn gather_indices(
        &self,
        queries: usize,
        keys: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let rows = self.rows as u32;
        let mut c2p = Vec::with_capacity(queries * keys);
        let mut p2c = Vec::with_capacity(queries * keys);
        for q in 0..queries {
            for k in 0..keys {
                let row = self.row(q, k);
                c2p.push(q as u32 * rows + row);
                p2c.push(k as u32 * rows + row);
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

    /// transformers' p2c row is the c2p row of the same pair (so one row serves both), a
    /// window covers exactly the rows its inputs reach, and the flat indices address the
    /// rows of their own query (c2p) or key (p2c).
    #[test]
    fn windows_and_indices_address_the_rows_of_each_pair() {
        let positions = RelativePositions::new(4, 16);
        assert_eq!(positions.table_rows(), 8);
        for q in 0..40 {
            for k in 0..40 {
                assert_eq!(
                    positions.row_at(q as i64 - k as i64),
                    positions.p2c_row(q, k)
                );
            }
        }
        // Far keys clamp to the table's first row; the query itself reads the middle.
        assert_eq!(positions.row_at(-39), 0);
        assert_eq!(positions.row_at(0), 4);
        let short = positions.window(3);
        assert_eq!((short.first_row, short.rows), (2, 5));
        let long = positions.window(40);
        assert_eq!((long.first_row, long.rows), (0, 8));
        let (queries, keys) = (3, 40);
        let (c2p, p2c) = long.gather_indices(queries, keys, &Device::Cpu).unwrap();
        let (c2p, p2c) = (c2p.to_vec1::<u32>().unwrap(), p2c.to_vec1::<u32>().unwrap());
        for q in 0..queries {
            for k in 0..keys {
                let row = positions.row_at(q as i64 - k as i64);
                assert_eq!(long.row(q, k), row);
                assert_eq!(c2p[q * keys + k], q as u32 * 8 + row);
                assert_eq!(p2c[q * keys + k], k as u32 * 8 + row);
            }
        }
        // Unbucketed: plain distances, clamped to the table.
        let plain = RelativePositions::new(-1, 3);
        assert_eq!(plain.table_rows(), 6);
        assert_eq!(plain.row_at(5), 5);
        assert_eq!(plain.row_at(1), 4);
        assert_eq!(plain.row_at(-9), 0);
        let window = plain.window(2);
        assert_eq!((window.first_row, window.rows), (2, 3));
        assert_eq!(window.row(1, 0), 2);
    }
}
