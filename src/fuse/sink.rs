//! Where fused tensors go: nowhere (inspect), candle tensors for the model loader (serve),
//! or safetensors files (`warm fuse`, see writer.rs).

use std::collections::HashMap;

use half::{bf16, f16};

use super::plan::PlannedTensor;
use super::FuseError;

/// One fused tensor's data in its output type.
pub enum FusedData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    /// Integer tensors, copied as stored (little-endian).
    Raw(Vec<u8>),
}

impl FusedData {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::F32(v) => bytemuck::cast_slice(v),
            Self::F16(v) => bytemuck::cast_slice(v),
            Self::BF16(v) => bytemuck::cast_slice(v),
            Self::Raw(v) => v,
        }
    }
}

/// Receives the fused tensors one at a time, in plan order.
pub trait TensorSink {
    fn put(&mut self, tensor: &PlannedTensor, data: FusedData) -> Result<(), FuseError>;

    /// Whether the sink takes a tensor in consecutive parts through [`Self::put_part`]: a
    /// writer can then start on a large tensor (an embedding matrix, a third of a small
    /// model) before all of it is averaged.
    fn takes_parts(&self) -> bool {
        false
    }

    /// The next part of `tensor`, in order; `last` marks the one that completes it.
    fn put_part(
        &mut self,
        tensor: &PlannedTensor,
        _data: FusedData,
        _last: bool,
    ) -> Result<(), FuseError> {
        Err(FuseError::Load {
            tensor: tensor.name.clone(),
            reason: "this sink takes whole tensors only".into(),
        })
    }

    /// A buffer the sink is done with, to be filled again instead of allocating fresh
    /// pages for every tensor (sinks that keep their tensors have none).
    fn spare(&mut self) -> Option<FusedData> {
        None
    }
}

/// Drops every tensor (`warm inspect` only wants the statistics), keeping the last buffer
/// for reuse.
#[derive(Default)]
pub struct DiscardSink {
    last: Option<FusedData>,
}

impl TensorSink for DiscardSink {
    fn put(&mut self, _: &PlannedTensor, data: FusedData) -> Result<(), FuseError> {
        self.last = Some(data);
        Ok(())
    }

    fn spare(&mut self) -> Option<FusedData> {
        self.last.take()
    }
}

/// Builds candle tensors on a device without an intermediate copy on the CPU: the fused
/// vectors become the tensors' storage. Feed the map to `VarBuilder::from_tensors`.
pub struct CandleSink {
    device: candle_core::Device,
    tensors: HashMap<String, candle_core::Tensor>,
}

impl CandleSink {
    pub fn new(device: candle_core::Device) -> Self {
        Self {
            device,
            tensors: HashMap::new(),
        }
    }

    pub fn into_tensors(self) -> HashMap<String, candle_core::Tensor> {
        self.tensors
    }
}

impl TensorSink for CandleSink {
    fn put(&mut self, tensor: &PlannedTensor, data: FusedData) -> Result<(), FuseError> {
        use candle_core::Tensor;
        let shape = tensor.shape.as_slice();
        let load_err = |e: candle_core::Error| FuseError::Load {
            tensor: tensor.name.clone(),
            reason: e.to_string(),
        };
        let t = match data {
            FusedData::F32(v) => Tensor::from_vec(v, shape, &self.device),
            FusedData::F16(v) => Tensor::from_vec(v, shape, &self.device),
            FusedData::BF16(v) => Tensor::from_vec(v, shape, &self.device),
            FusedData::Raw(bytes) => raw_tensor(tensor, &bytes, &self.device),
        }
        .map_err(load_err)?;
        self.tensors.insert(tensor.name.clone(), t);
        Ok(())
    }
}

/// Integer tensors in the types candle has; others are widened to i64, which is what
/// model code reads such buffers (position ids, token type ids) as.
fn raw_tensor(
    tensor: &PlannedTensor,
    bytes: &[u8],
    device: &candle_core::Device,
) -> candle_core::Result<candle_core::Tensor> {
    use crate::dtype::DType;
    use candle_core::Tensor;
    let shape = tensor.shape.as_slice();
    match tensor.output {
        DType::U8 | DType::Bool => Tensor::from_vec(bytes.to_vec(), shape, device),
        DType::U32 => Tensor::from_vec(le_values(bytes, u32::from_le_bytes), shape, device),
        DType::I64 => Tensor::from_vec(le_values(bytes, i64::from_le_bytes), shape, device),
        DType::I32 => Tensor::from_vec(widen(le_values(bytes, i32::from_le_bytes)), shape, device),
        DType::I16 => Tensor::from_vec(widen(le_values(bytes, i16::from_le_bytes)), shape, device),
        DType::U16 => Tensor::from_vec(widen(le_values(bytes, u16::from_le_bytes)), shape, device),
        DType::I8 => Tensor::from_vec(widen(le_values(bytes, i8::from_le_bytes)), shape, device),
        other => Err(candle_core::Error::Msg(format!(
            "dtype {other} is not supported for loading"
        ))),
    }
}

fn le_values<T, const N: usize>(bytes: &[u8], from: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            from(a)
        })
        .collect()
}

fn widen<T: Into<i64>>(values: Vec<T>) -> Vec<i64> {
    values.into_iter().map(Into::into).collect()
}
