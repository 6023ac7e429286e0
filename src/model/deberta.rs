//! DebertaV2ForSequenceClassification through candle-transformers' DeBERTa-v2 (disentangled
//! relative attention with position buckets, ContextPooler on [CLS], classifier), which has
//! padding masks and the classification head; parity is checked by the fixtures.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::debertav2::{Config, DebertaV2SeqClassificationModel};

use super::{
    load_err, logits_to_rows, parse_config, unshared_work, BatchLayout, Forward, ModelError,
    PaddedBatch, Pooling, RewardModel, Sequence,
};

pub struct DebertaModel {
    inner: DebertaV2SeqClassificationModel,
    use_type_ids: bool,
    pad_id: u32,
    max_positions: usize,
    num_labels: usize,
}

pub fn load(raw: &serde_json::Value, vb: VarBuilder) -> Result<Box<dyn RewardModel>, ModelError> {
    let mut raw = raw.clone();
    // candle's config requires the dropout fields; transformers' defaults fill any gaps.
    if let Some(map) = raw.as_object_mut() {
        for (key, default) in [
            ("hidden_dropout_prob", 0.1),
            ("attention_probs_dropout_prob", 0.1),
            ("initializer_range", 0.02),
            ("pooler_dropout", 0.0),
        ] {
            map.entry(key).or_insert(default.into());
        }
        if !map.contains_key("pooler_hidden_size") {
            let hidden = map.get("hidden_size").cloned().unwrap_or_default();
            map.insert("pooler_hidden_size".into(), hidden);
        }
    }
    let cfg: Config = parse_config(&raw)?;
    let num_labels = cfg.id2label.as_ref().map_or(1, |m| m.len());
    // The encoder lives under `deberta.`; the pooler and classifier at the root.
    let inner = DebertaV2SeqClassificationModel::load(vb.pp("deberta"), &cfg, cfg.id2label.clone())
        .map_err(load_err)?;
    Ok(Box::new(DebertaModel {
        inner,
        use_type_ids: cfg.type_vocab_size > 0,
        pad_id: cfg.pad_token_id.unwrap_or(0) as u32,
        max_positions: cfg.max_position_embeddings,
        num_labels,
    }))
}

impl RewardModel for DebertaModel {
    fn logits(&self, sequences: &[&Sequence]) -> Result<Forward, ModelError> {
        let device = self.inner.device.clone();
        let batch = PaddedBatch::new(sequences, self.pad_id, &device)?;
        let mut mask = vec![0i64; sequences.len() * batch.seq_len];
        for (b, &len) in batch.lengths.iter().enumerate() {
            mask[b * batch.seq_len..b * batch.seq_len + len].fill(1);
        }
        let mask = Tensor::from_vec(mask, (sequences.len(), batch.seq_len), &device)?;
        let type_ids = self.use_type_ids.then(|| batch.type_ids.clone());
        let logits = self.inner.forward(&batch.ids, type_ids, Some(mask))?;
        Ok(Forward {
            logits: logits_to_rows(&logits.to_dtype(DType::F32)?)?,
            work: unshared_work(BatchLayout::Padded, sequences),
        })
    }

    fn max_input_length(&self) -> usize {
        self.max_positions
    }

    fn pooling(&self) -> Pooling {
        Pooling::First
    }

    fn num_labels(&self) -> usize {
        self.num_labels
    }
}
