//! Fusion bandwidth of the CPU averaging kernel per dtype (GB/s of member bytes read),
//! against a plain copy of the same bytes in the same run.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use warm::dtype::FloatDType;
use warm::fuse::kernel;

/// Members of the main benchmark, and of the one for larger sets.
const MEMBERS: usize = 4;
const MANY_MEMBERS: usize = 8;
const ELEMENTS: usize = 8 << 20;

fn member_bytes(dtype: FloatDType, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..ELEMENTS)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
            match dtype {
                FloatDType::F32 => v.to_le_bytes().to_vec(),
                FloatDType::F16 => f16::from_f32(v).to_bits().to_le_bytes().to_vec(),
                FloatDType::BF16 => bf16::from_f32(v).to_bits().to_le_bytes().to_vec(),
            }
        })
        .collect()
}

fn fusion(c: &mut Criterion) {
    let mut group = c.benchmark_group("fusion");
    group.sample_size(10);
    for dtype in [FloatDType::F32, FloatDType::F16, FloatDType::BF16] {
        let all: Vec<Vec<u8>> = (0..MANY_MEMBERS as u64)
            .map(|s| member_bytes(dtype, s + 1))
            .collect();
        for (name, m) in [("average", MEMBERS), ("average8", MANY_MEMBERS)] {
            let inputs: Vec<&[u8]> = all[..m].iter().map(Vec::as_slice).collect();
            let read: usize = inputs.iter().map(|x| x.len()).sum();
            group.throughput(Throughput::Bytes(read as u64));
            let weights = vec![1.0 / m as f32; m];
            group.bench_function(BenchmarkId::new(name, dtype), |b| match dtype {
                FloatDType::F32 => {
                    let mut out = vec![0f32; ELEMENTS];
                    b.iter(|| kernel::average(&inputs, dtype, &weights, 0, &mut out));
                }
                FloatDType::F16 => {
                    let mut out = vec![f16::ZERO; ELEMENTS];
                    b.iter(|| kernel::average(&inputs, dtype, &weights, 0, &mut out));
                }
                FloatDType::BF16 => {
                    let mut out = vec![bf16::ZERO; ELEMENTS];
                    b.iter(|| kernel::average(&inputs, dtype, &weights, 0, &mut out));
                }
            });
        }
        let members = &all[..MEMBERS];
        let read: usize = members.iter().map(Vec::len).sum();
        group.throughput(Throughput::Bytes(read as u64));
        group.bench_function(BenchmarkId::new("memcpy", dtype), |b| {
            let mut out = vec![0u8; members[0].len()];
            b.iter(|| {
                for m in members {
                    out.copy_from_slice(m);
                    std::hint::black_box(&out);
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, fusion);
criterion_main!(benches);
