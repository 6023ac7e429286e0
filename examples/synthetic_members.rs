//! Writes M synthetic "fine-tuned" members of a Llama-shaped reward model (shared random
//! init plus small per-member noise) for fusion benchmarks:
//!
//!   cargo run --release --example synthetic_members -- OUT_DIR MEMBERS HIDDEN LAYERS VOCAB DTYPE
//!
//! e.g. `/tmp/members 4 768 12 52000 f32` makes four members of about 500 MB each.

use std::path::PathBuf;

use half::{bf16, f16};
use warm::dtype::FloatDType;
use warm::fuse::{FusedData, PlannedTensor, SafetensorsWriter, TensorSink};

struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, members, hidden, layers, vocab, dtype] = args.as_slice() else {
        return Err("usage: synthetic_members OUT_DIR MEMBERS HIDDEN LAYERS VOCAB DTYPE".into());
    };
    let out = PathBuf::from(out);
    let (members, hidden, layers, vocab): (usize, usize, usize, usize) = (
        members.parse()?,
        hidden.parse()?,
        layers.parse()?,
        vocab.parse()?,
    );
    let dtype: FloatDType = dtype.parse()?;
    let inter = hidden * 8 / 3;
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![hidden, hidden]),
            ("self_attn.k_proj.weight", vec![hidden, hidden]),
            ("self_attn.v_proj.weight", vec![hidden, hidden]),
            ("self_attn.o_proj.weight", vec![hidden, hidden]),
            ("mlp.gate_proj.weight", vec![inter, hidden]),
            ("mlp.up_proj.weight", vec![inter, hidden]),
            ("mlp.down_proj.weight", vec![hidden, inter]),
            ("input_layernorm.weight", vec![hidden]),
            ("post_attention_layernorm.weight", vec![hidden]),
        ] {
            shapes.push((format!("{p}.{name}"), shape));
        }
    }
    shapes.push(("model.norm.weight".into(), vec![hidden]));
    shapes.push(("score.weight".into(), vec![1, hidden]));
    let planned: Vec<PlannedTensor> = shapes
        .iter()
        .map(|(name, shape)| PlannedTensor {
            name: name.clone(),
            shape: shape.clone(),
            stored: dtype.dtype(),
            output: dtype.dtype(),
        })
        .collect();
    let config = serde_json::json!({
        "architectures": ["LlamaForSequenceClassification"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": hidden / 64, "num_key_value_heads": hidden / 64,
        "vocab_size": vocab, "num_labels": 1, "torch_dtype": dtype.torch_name(),
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": false, "pad_token_id": 0,
    });
    for m in 0..members {
        let dir = out.join(format!("member{m}"));
        let mut writer =
            SafetensorsWriter::create(&dir, &planned, u64::MAX, 0, &Default::default())?;
        // The init is the same stream for every member; the noise stream differs.
        let (mut init, mut noise) = (Rng(0x5eed), Rng(1000 + m as u64));
        for t in &planned {
            let values: Vec<f32> = (0..t.numel())
                .map(|_| 0.05 * init.uniform() + 0.002 * noise.uniform())
                .collect();
            let data = match dtype {
                FloatDType::F32 => FusedData::F32(values),
                FloatDType::F16 => {
                    FusedData::F16(values.iter().map(|&v| f16::from_f32(v)).collect())
                }
                FloatDType::BF16 => {
                    FusedData::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect())
                }
            };
            writer.put(t, data)?;
        }
        writer.finish()?;
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
        eprintln!("wrote {}", dir.display());
    }
    Ok(())
}
