//! Makes M "fine-tuned" members from one checkpoint for benchmarks: every float tensor plus
//! seeded noise of relative size SCALE (f32 checkpoints), the other files copied.
//!
//!   cargo run --release --example perturbed_members -- MODEL_DIR OUT_DIR M [SCALE]

use std::path::PathBuf;

use warm::checkpoint::Checkpoint;
use warm::dtype::DType;
use warm::fuse::{FusedData, PlannedTensor, SafetensorsWriter, TensorSink};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [src, out, m, rest @ ..] = args.as_slice() else {
        return Err("usage: perturbed_members MODEL_DIR OUT_DIR M [SCALE]".into());
    };
    let members: usize = m.parse()?;
    let scale: f32 = rest.first().map_or(Ok(0.01), |s| s.parse())?;
    let source = Checkpoint::open(&PathBuf::from(src))?;
    let tensors: Vec<PlannedTensor> = source
        .tensors_in_file_order()
        .map(|t| PlannedTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            stored: t.dtype,
            output: t.dtype,
        })
        .collect();
    for k in 0..members {
        let dir = PathBuf::from(out).join(format!("member{k}"));
        let mut writer =
            SafetensorsWriter::create(&dir, &tensors, u64::MAX, 0, &Default::default())?;
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (k as u64 + 1);
        for t in &tensors {
            let (file, info) = source.tensor(&t.name).ok_or("tensor vanished")?;
            let bytes = file.bytes(info);
            let data = if t.stored == DType::F32 {
                let values: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|c| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let noise = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        v + scale * v.abs().max(1e-3) * noise
                    })
                    .collect();
                FusedData::F32(values)
            } else {
                FusedData::Raw(bytes.to_vec())
            };
            writer.put(t, data)?;
        }
        writer.finish()?;
        for entry in std::fs::read_dir(src)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if entry.path().is_file()
                && !name.ends_with(".safetensors")
                && !name.ends_with(".index.json")
                && name != "expected.json"
            {
                std::fs::copy(entry.path(), dir.join(&name))?;
            }
        }
        eprintln!("wrote {}", dir.display());
    }
    Ok(())
}
