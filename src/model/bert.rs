//! BERT, RoBERTa/XLM-RoBERTa and DistilBERT sequence classification: a post-LayerNorm
//! transformer encoder. BERT reads its pooler (dense + tanh on [CLS]) into `classifier`;
//! RoBERTa's head is dense + tanh + `out_proj` on <s>, and its position ids start after the
//! padding id (pad + 1 + i for real tokens); DistilBERT's is `pre_classifier` + ReLU +
//! `classifier` on [CLS], with no token types and its own tensor names.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Activation, Embedding, LayerNorm, VarBuilder};

use super::dense::Dense;

use super::layers::{embedding, layer_norm, linear, padding_mask, split_heads, Packing};
use super::packed_attention::{self, KeySpan, Queries, Spec};
use super::segments::Segments;
use super::{
    load_err, logits_to_rows, parse_config, unshared_work, BatchLayout, Forward, ModelError,
    PaddedBatch, Pooling, RewardModel, Sequence,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Bert,
    Roberta,
    DistilBert,
}

/// config.json under BERT's names; DistilBERT's own (`dim`, `n_layers`, ...) are read as
/// aliases.
#[derive(serde::Deserialize)]
struct Config {
    vocab_size: usize,
    #[serde(alias = "dim")]
    hidden_size: usize,
    #[serde(alias = "n_layers")]
    num_hidden_layers: usize,
    #[serde(alias = "n_heads")]
    num_attention_heads: usize,
    #[serde(alias = "hidden_dim")]
    intermediate_size: usize,
    #[serde(alias = "activation")]
    hidden_act: Activation,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default)]
    position_embedding_type: Option<String>,
    #[serde(default)]
    num_labels: Option<usize>,
    #[serde(default)]
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
}

fn default_type_vocab() -> usize {
    2
}

fn default_eps() -> f64 {
    1e-12
}

struct Layer {
    query: Dense,
    key: Dense,
    value: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    out_norm: LayerNorm,
}

enum Head {
    /// BERT: pooler dense + tanh, then the classifier.
    Pooler { dense: Dense, classifier: Dense },
    /// RoBERTa: classifier.dense + tanh + classifier.out_proj.
    Roberta { dense: Dense, out_proj: Dense },
    /// DistilBERT: pre_classifier + ReLU + classifier.
    PreClassifier { dense: Dense, classifier: Dense },
}

/// Where a flavour keeps its tensors.
struct Names {
    prefix: &'static str,
    layers: &'static str,
    query: &'static str,
    key: &'static str,
    value: &'static str,
    attn_out: &'static str,
    attn_norm: &'static str,
    intermediate: &'static str,
    output: &'static str,
    out_norm: &'static str,
}

impl Names {
    fn of(flavour: Flavour) -> Self {
        let bert = Self {
            prefix: "bert",
            layers: "encoder.layer",
            query: "attention.self.query",
            key: "attention.self.key",
            value: "attention.self.value",
            attn_out: "attention.output.dense",
            attn_norm: "attention.output.LayerNorm",
            intermediate: "intermediate.dense",
            output: "output.dense",
            out_norm: "output.LayerNorm",
        };
        match flavour {
            Flavour::Bert => bert,
            Flavour::Roberta => Self {
                prefix: "roberta",
                ..bert
            },
            Flavour::DistilBert => Self {
                prefix: "distilbert",
                layers: "transformer.layer",
                query: "attention.q_lin",
                key: "attention.k_lin",
                value: "attention.v_lin",
                attn_out: "attention.out_lin",
                attn_norm: "sa_layer_norm",
                intermediate: "ffn.lin1",
                output: "ffn.lin2",
                out_norm: "output_layer_norm",
            },
        }
    }
}

pub struct BertModel {
    flavour: Flavour,
    words: Embedding,
    positions: Embedding,
    token_types: Option<Embedding>,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    head: Head,
    act: Activation,
    heads: usize,
    head_dim: usize,
    pad_id: u32,
    max_positions: usize,
    num_labels: usize,
}

pub fn load(
    raw: &serde_json::Value,
    vb: VarBuilder,
    flavour: Flavour,
) -> std::result::Result<Box<dyn RewardModel>, ModelError> {
    let cfg: Config = parse_config(raw)?;
    if let Some(kind) = cfg
        .position_embedding_type
        .as_deref()
        .filter(|k| *k != "absolute")
    {
        return Err(ModelError::Config(format!(
            "position_embedding_type '{kind}' is not supported (only 'absolute')"
        )));
    }
    let num_labels = cfg
        .num_labels
        .or(cfg.id2label.as_ref().map(|m| m.len()))
        .unwrap_or(2);
    BertModel::new(&cfg, vb, flavour, num_labels)
        .map(|m| Box::new(m) as Box<dyn RewardModel>)
        .map_err(load_err)
}

impl BertModel {
    fn new(cfg: &Config, vb: VarBuilder, flavour: Flavour, num_labels: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let names = Names::of(flavour);
        let prefix = names.prefix;
        let base = if vb.contains_tensor(&format!("{prefix}.embeddings.word_embeddings.weight")) {
            vb.pp(prefix)
        } else {
            vb.clone()
        };
        let emb = base.pp("embeddings");
        let token_types = if flavour != Flavour::DistilBert
            && cfg.type_vocab_size > 0
            && emb.contains_tensor("token_type_embeddings.weight")
        {
            Some(embedding(
                emb.pp("token_type_embeddings"),
                cfg.type_vocab_size,
                h,
            )?)
        } else {
            None
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = base.pp(format!("{}.{i}", names.layers));
                Ok(Layer {
                    query: linear(l.pp(names.query), h, h, true)?,
                    key: linear(l.pp(names.key), h, h, true)?,
                    value: linear(l.pp(names.value), h, h, true)?,
                    attn_out: linear(l.pp(names.attn_out), h, h, true)?,
                    attn_norm: layer_norm(l.pp(names.attn_norm), h, cfg.layer_norm_eps)?,
                    intermediate: linear(l.pp(names.intermediate), h, cfg.intermediate_size, true)?,
                    output: linear(l.pp(names.output), cfg.intermediate_size, h, true)?,
                    out_norm: layer_norm(l.pp(names.out_norm), h, cfg.layer_norm_eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = match flavour {
            Flavour::Bert => Head::Pooler {
                dense: linear(base.pp("pooler.dense"), h, h, true)?,
                classifier: linear(vb.pp("classifier"), h, num_labels, true)?,
            },
            Flavour::Roberta => Head::Roberta {
                dense: linear(vb.pp("classifier.dense"), h, h, true)?,
                out_proj: linear(vb.pp("classifier.out_proj"), h, num_labels, true)?,
            },
            Flavour::DistilBert => Head::PreClassifier {
                dense: linear(vb.pp("pre_classifier"), h, h, true)?,
                classifier: linear(vb.pp("classifier"), h, num_labels, true)?,
            },
        };
        let pad_id = cfg.pad_token_id.unwrap_or(match flavour {
            Flavour::Bert | Flavour::DistilBert => 0,
            Flavour::Roberta => 1,
        });
        let max_positions = match flavour {
            Flavour::Bert | Flavour::DistilBert => cfg.max_position_embeddings,
            // Positions start at pad_id + 1.
            Flavour::Roberta => cfg
                .max_position_embeddings
                .saturating_sub(pad_id as usize + 1),
        };
        Ok(Self {
            flavour,
            words: embedding(emb.pp("word_embeddings"), cfg.vocab_size, h)?,
            positions: embedding(
                emb.pp("position_embeddings"),
                cfg.max_position_embeddings,
                h,
            )?,
            token_types,
            embed_norm: layer_norm(emb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            layers,
            head,
            act: cfg.hidden_act,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            pad_id,
            max_positions,
            num_labels,
        })
    }

    fn position_ids(&self, batch: &PaddedBatch, sequences: &[&Sequence]) -> Result<Tensor> {
        let s = batch.seq_len;
        let mut ids = Vec::with_capacity(sequences.len() * s);
        for seq in sequences {
            match self.flavour {
                Flavour::Bert | Flavour::DistilBert => {
                    ids.extend((0..s as u32).map(|p| p.min(self.max_positions as u32 - 1)))
                }
                Flavour::Roberta => {
                    // transformers: cumsum(ids != pad) * (ids != pad) + pad.
                    let mut count = 0;
                    for p in 0..s {
                        let real = seq.ids.get(p).is_some_and(|&t| t != self.pad_id);
                        count += u32::from(real);
                        ids.push(if real {
                            self.pad_id + count
                        } else {
                            self.pad_id
                        });
                    }
                }
            }
        }
        Tensor::from_vec(ids, (sequences.len(), s), batch.ids.device())
    }

    fn forward(&self, sequences: &[&Sequence]) -> Result<Tensor> {
        let device = self.words.embeddings().device();
        let batch = PaddedBatch::new(sequences, self.pad_id, device)?;
        // Dense layers run on the real tokens only (packed rows); attention on the padded
        // layout rebuilt from them.
        let packing = Packing::new(&batch.lengths, batch.seq_len, device)?;
        let ids = packing.pack(&batch.ids)?;
        let positions = packing.pack(&self.position_ids(&batch, sequences)?)?;
        let mut x = (self.words.forward(&ids)? + self.positions.forward(&positions)?)?;
        x = match (&self.token_types, self.flavour) {
            (Some(tt), Flavour::Bert) => (x + tt.forward(&packing.pack(&batch.type_ids)?)?)?,
            // RoBERTa tokenizers return no token type ids: transformers uses zeros.
            (Some(tt), Flavour::Roberta) => (x + tt.forward(&ids.zeros_like()?)?)?,
            // DistilBERT has none (never loaded).
            (Some(_), Flavour::DistilBert) | (None, _) => x,
        };
        x = self.embed_norm.forward(&x)?;
        // On the CPU in f32 attention runs on the packed rows too; elsewhere on the padded
        // layout rebuilt from them, with a mask hiding the padding.
        let on_packed_rows = packed_attention::applies(device, x.dtype());
        // Encoders attend both ways: nothing is shared between inputs.
        let segments = Segments::plain(&batch.lengths);
        let mask = padding_mask(&batch.lengths, batch.seq_len, device)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let spec = Spec {
            heads: self.heads,
            kv_heads: self.heads,
            head_dim: self.head_dim,
            scale: scale as f32,
            softcap: None,
            keys: KeySpan::All,
        };
        let last = self.layers.len().saturating_sub(1);
        let split = |t: &Tensor| split_heads(t, self.heads, self.head_dim);
        for (i, layer) in self.layers.iter().enumerate() {
            // The head reads only the first token, so the last layer computes that row
            // alone (its keys and values still come from every token).
            let only_first = i == last;
            let rows = if only_first {
                packing.first_rows(&x)?
            } else {
                x.clone()
            };
            let q = layer.query.forward(&rows)?;
            let k = layer.key.forward(&x)?;
            let v = layer.value.forward(&x)?;
            let attn = if on_packed_rows {
                let queries = if only_first {
                    Queries::First
                } else {
                    Queries::Every
                };
                packed_attention::attend(&spec, &segments, queries, &q, &k, &v)?
                    .ok_or_else(packed_attention::refused)?
            } else {
                let q = if only_first {
                    q.unsqueeze(1)?
                } else {
                    packing.unpack(&q)?
                };
                let attn = super::layers::attention(
                    &split(&q)?,
                    &split(&packing.unpack(&k)?)?,
                    &split(&packing.unpack(&v)?)?,
                    &mask,
                    scale,
                    None,
                )?;
                if only_first {
                    attn.squeeze(1)?
                } else {
                    packing.pack(&attn)?
                }
            };
            let h = layer
                .attn_norm
                .forward(&layer.attn_out.forward_add(&attn, &rows)?)?;
            let inner = super::gelu::activate(self.act, &layer.intermediate.forward(&h)?)?;
            x = layer
                .out_norm
                .forward(&layer.output.forward_add(&inner, &h)?)?;
        }
        let first = if self.layers.is_empty() {
            packing.first_rows(&x)?
        } else {
            x
        };
        match &self.head {
            Head::Pooler { dense, classifier } => {
                classifier.forward(&dense.forward(&first)?.tanh()?)
            }
            Head::Roberta { dense, out_proj } => out_proj.forward(&dense.forward(&first)?.tanh()?),
            Head::PreClassifier { dense, classifier } => {
                classifier.forward(&dense.forward(&first)?.relu()?)
            }
        }
    }
}

impl RewardModel for BertModel {
    fn logits(&self, sequences: &[&Sequence]) -> std::result::Result<Forward, ModelError> {
        Ok(Forward {
            logits: logits_to_rows(&self.forward(sequences)?)?,
            steps: None,
            objectives: None,
            work: unshared_work(self.batch_layout(), sequences),
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

    fn token_type_rows(&self) -> Option<usize> {
        match (&self.token_types, self.flavour) {
            (Some(types), Flavour::Bert) => types.embeddings().dims().first().copied(),
            // RoBERTa reads zeros whatever the tokenizer says (see forward).
            _ => None,
        }
    }

    fn batch_layout(&self) -> BatchLayout {
        let weights = self.words.embeddings();
        if packed_attention::applies(weights.device(), weights.dtype()) {
            BatchLayout::Packed
        } else {
            BatchLayout::Padded
        }
    }
}
