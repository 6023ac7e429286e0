//! DebertaV2ForSequenceClassification (DeBERTa-v2 and v3): a post-LayerNorm encoder whose
//! attention adds disentangled relative-position terms (content->position and
//! position->content over log-bucketed distances), the optional convolution after the
//! first layer (deberta-v2-xlarge/xxlarge), and the ContextPooler head on [CLS].
//!
//! Written after transformers' modeling_deberta_v2 (the parity reference): candle-
//! transformers' version has no convolution (`todo!()`) and builds some tensors in f32.
//! Dense work runs on the real tokens only (packed rows); attention too on the CPU in f32,
//! elsewhere on the padded layout. Either way a relative term is one product of the rows
//! with the part of the relative table the batch's lengths reach (its window).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Activation, Embedding, LayerNorm, VarBuilder};

use super::dense::Dense;
use super::layers::{attention, embedding, layer_norm, linear, padding_mask, split_heads, Packing};
use super::packed_attention::{self, KeySpan, RelativeBias, Spec};
use super::relative_position::{RelativePositions, RelativeWindow};
use super::segments::Segments;
use super::{
    load_err, logits_to_rows, parse_config, unshared_work, BatchLayout, Forward, ModelError,
    PaddedBatch, Pooling, RewardModel, Sequence,
};

/// config.json as transformers' DebertaV2Config reads it (defaults included).
#[derive(serde::Deserialize)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    type_vocab_size: Option<usize>,
    #[serde(default)]
    layer_norm_eps: Option<f64>,
    #[serde(default)]
    relative_attention: Option<bool>,
    #[serde(default)]
    max_relative_positions: Option<i64>,
    #[serde(default)]
    position_buckets: Option<i64>,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default)]
    position_biased_input: Option<bool>,
    #[serde(default)]
    pos_att_type: Option<Names>,
    #[serde(default)]
    share_att_key: Option<bool>,
    #[serde(default)]
    attention_head_size: Option<usize>,
    #[serde(default)]
    embedding_size: Option<usize>,
    #[serde(default)]
    norm_rel_ebd: Option<Names>,
    #[serde(default)]
    conv_kernel_size: Option<usize>,
    #[serde(default)]
    conv_groups: Option<usize>,
    #[serde(default)]
    conv_act: Option<String>,
    #[serde(default)]
    pooler_hidden_size: Option<usize>,
    #[serde(default)]
    pooler_hidden_act: Option<String>,
    #[serde(default)]
    num_labels: Option<usize>,
    #[serde(default)]
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A list of names, in config.json either as a list or joined with `|` ("p2c|c2p").
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Names {
    Joined(String),
    List(Vec<String>),
}

impl Names {
    fn contains(&self, name: &str) -> bool {
        let matches = |n: &str| n.trim().eq_ignore_ascii_case(name);
        match self {
            Self::Joined(joined) => joined.split('|').any(matches),
            Self::List(list) => list.iter().any(|n| matches(n)),
        }
    }
}

/// An activation by its transformers (ACT2FN) name: candle's, plus tanh (the default of
/// the convolution, and a pooler's).
#[derive(Debug, Clone, Copy)]
enum Act {
    Tanh,
    Nn(Activation),
}

impl Act {
    fn parse(
        field: &str,
        name: Option<&str>,
        default: &str,
    ) -> std::result::Result<Self, ModelError> {
        let name = name.unwrap_or(default);
        if name == "tanh" {
            return Ok(Self::Tanh);
        }
        serde_json::from_value(serde_json::Value::String(name.into()))
            .map(Self::Nn)
            .map_err(|_| ModelError::Config(format!("{field} '{name}' is not supported")))
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Tanh => x.tanh(),
            Self::Nn(act) => super::gelu::activate(act, x),
        }
    }
}

/// What config.json decides beyond tensor shapes, checked before any tensor is read.
struct Settings {
    act: Act,
    pooler_act: Act,
    /// Relative attention's positions, with which terms it adds (c2p, p2c).
    relative: Option<(RelativePositions, bool, bool)>,
    share_att_key: bool,
    norm_relative: bool,
    /// sqrt(head_dim * (1 + terms)), transformers' divisor of every score.
    scale_factor: usize,
    head_dim: usize,
    embedding_size: usize,
    max_positions: usize,
    eps: f64,
    conv: Option<ConvSettings>,
    num_labels: usize,
}

struct ConvSettings {
    kernel: usize,
    groups: usize,
    act: Act,
}

impl Settings {
    fn read(cfg: &Config) -> std::result::Result<Self, ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        let heads = cfg.num_attention_heads;
        if heads == 0 {
            return bad("num_attention_heads is 0".into());
        }
        let head_dim = match cfg.attention_head_size {
            Some(d) => d,
            None if cfg.hidden_size.is_multiple_of(heads) => cfg.hidden_size / heads,
            None => {
                return bad(format!(
                    "hidden_size {} is not a multiple of num_attention_heads {heads}",
                    cfg.hidden_size
                ))
            }
        };
        let types = cfg.pos_att_type.as_ref();
        let (c2p, p2c) = (
            types.is_some_and(|t| t.contains("c2p")),
            types.is_some_and(|t| t.contains("p2c")),
        );
        let max_positions = cfg.max_position_embeddings.unwrap_or(512);
        let relative = if cfg.relative_attention.unwrap_or(false) {
            let buckets = cfg.position_buckets.unwrap_or(-1);
            if buckets == 1 {
                return bad("position_buckets 1 leaves no bucket below the log range".into());
            }
            let max_relative = match cfg.max_relative_positions.unwrap_or(-1) {
                m if m < 1 => max_positions as i64,
                m => m,
            };
            Some((RelativePositions::new(buckets, max_relative), c2p, p2c))
        } else {
            None
        };
        let conv = match cfg.conv_kernel_size.unwrap_or(0) {
            0 => None,
            kernel if kernel % 2 == 0 => {
                return bad(format!(
                    "conv_kernel_size {kernel} is even: transformers pads (k - 1) / 2 on each \
                     side, which keeps the length for odd sizes only"
                ))
            }
            kernel => {
                let groups = cfg.conv_groups.unwrap_or(1);
                if groups == 0 || !cfg.hidden_size.is_multiple_of(groups) {
                    return bad(format!(
                        "conv_groups {groups} does not divide hidden_size {}",
                        cfg.hidden_size
                    ));
                }
                Some(ConvSettings {
                    kernel,
                    groups,
                    act: Act::parse("conv_act", cfg.conv_act.as_deref(), "tanh")?,
                })
            }
        };
        if let Some(pooler) = cfg.pooler_hidden_size.filter(|&p| p != cfg.hidden_size) {
            return bad(format!(
                "pooler_hidden_size {pooler} differs from hidden_size {}: transformers' \
                 classifier reads hidden_size features",
                cfg.hidden_size
            ));
        }
        Ok(Self {
            act: Act::parse("hidden_act", cfg.hidden_act.as_deref(), "gelu")?,
            pooler_act: Act::parse(
                "pooler_hidden_act",
                cfg.pooler_hidden_act.as_deref(),
                "gelu",
            )?,
            relative,
            share_att_key: cfg.share_att_key.unwrap_or(false),
            norm_relative: cfg
                .norm_rel_ebd
                .as_ref()
                .is_some_and(|n| n.contains("layer_norm")),
            scale_factor: 1 + usize::from(c2p) + usize::from(p2c),
            head_dim,
            embedding_size: cfg.embedding_size.unwrap_or(cfg.hidden_size),
            max_positions,
            eps: cfg.layer_norm_eps.unwrap_or(1e-7),
            conv,
            num_labels: cfg
                .num_labels
                .or(cfg.id2label.as_ref().map(|m| m.len()))
                .unwrap_or(2),
        })
    }
}

struct Attention {
    query: Dense,
    key: Dense,
    value: Dense,
    /// The relative table seen by the c2p term (key side) and the p2c term (query side),
    /// projected once at load: `[heads, head_dim, 2 span]`.
    c2p_table: Option<Tensor>,
    p2c_table: Option<Tensor>,
    out: Dense,
    out_norm: LayerNorm,
}

struct Layer {
    attention: Attention,
    intermediate: Dense,
    output: Dense,
    out_norm: LayerNorm,
}

/// The convolution transformers' ConvLayer adds after the first layer: a 1-D convolution
/// over the embeddings (zero-padded, so padding tokens add nothing), the activation, then
/// LayerNorm(layer output + that).
struct Conv {
    weight: Tensor,
    bias: Tensor,
    settings: ConvSettings,
    norm: LayerNorm,
}

impl Conv {
    /// `embedded`: the embeddings as packed rows; `residual`: the first layer's output
    /// (packed rows, or each sequence's first row when that is all that is left to compute).
    fn forward(
        &self,
        embedded: &Tensor,
        residual: &Tensor,
        batch: &Batch,
        first_only: bool,
    ) -> Result<Tensor> {
        let padded = batch.packing.unpack(embedded)?;
        let padded = match &batch.real_rows {
            Some(real) => padded.broadcast_mul(&real.to_dtype(padded.dtype())?)?,
            None => padded,
        };
        let h = padded.dim(2)?;
        let out = padded
            .transpose(1, 2)?
            .contiguous()?
            .conv1d(
                &self.weight,
                (self.settings.kernel - 1) / 2,
                1,
                1,
                self.settings.groups,
            )?
            .broadcast_add(&self.bias.reshape((1, h, 1))?)?
            .transpose(1, 2)?;
        let out = if first_only {
            out.narrow(1, 0, 1)?.squeeze(1)?
        } else {
            batch.packing.pack(&out.contiguous()?)?
        };
        let out = self.settings.act.apply(&out)?;
        self.norm.forward(&(residual + out)?)
    }
}

/// The layout of one forward pass.
struct Batch {
    packing: Packing,
    /// Attention straight on the packed rows (the CPU in f32), else on the padded layout.
    on_packed_rows: bool,
    segments: Segments,
    /// The relative table's rows this batch reads (relative attention only).
    window: Option<RelativeWindow>,
    batch: usize,
    seq_len: usize,
    /// 1 for real tokens, 0 for padding, `[b, s, 1]` f32 (None without padding or
    /// convolution).
    real_rows: Option<Tensor>,
    /// Additive `[b, 1, 1, s]` mask hiding padded keys.
    key_mask: Tensor,
}

/// Which queries a layer computes, and for the padded layout the flat indices of their
/// relative terms (c2p, p2c).
struct Queries<'a> {
    first_only: bool,
    padded_indices: Option<&'a (Tensor, Tensor)>,
}

pub struct DebertaModel {
    words: Embedding,
    positions: Option<Embedding>,
    token_types: Option<Embedding>,
    embed_proj: Option<Dense>,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    conv: Option<Conv>,
    relative: Option<RelativePositions>,
    pooler: Dense,
    classifier: Dense,
    act: Act,
    pooler_act: Act,
    heads: usize,
    head_dim: usize,
    /// 1 / sqrt(head_dim * scale_factor), the divisor rounded to the model's dtype first as
    /// transformers does (`scale.to(dtype)`).
    inv_scale: f64,
    pad_id: u32,
    max_positions: usize,
    num_labels: usize,
}

pub fn load(
    raw: &serde_json::Value,
    vb: VarBuilder,
) -> std::result::Result<Box<dyn RewardModel>, ModelError> {
    let cfg: Config = parse_config(raw)?;
    let settings = Settings::read(&cfg)?;
    DebertaModel::new(&cfg, settings, vb)
        .map(|m| Box::new(m) as Box<dyn RewardModel>)
        .map_err(load_err)
}

/// `[heads, head_dim, rows]` from the relative table `[rows, hidden]` through a projection.
fn relative_table(proj: &Dense, table: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let rows = table.dim(0)?;
    proj.forward(table)?
        .reshape((rows, heads, head_dim))?
        .permute((1, 2, 0))?
        .contiguous()
}

/// `[.., heads * d]` rows -> `[heads, rows, d]`, for products with a per-head table.
fn heads_first(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let rows = x.elem_count() / (heads * head_dim).max(1);
    x.reshape((rows, heads, head_dim))?
        .transpose(0, 1)?
        .contiguous()
}

/// A scalar rounded to `dtype`, as torch's `scale.to(dtype)` rounds it.
fn rounded_to(value: f32, dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => f64::from(half::bf16::from_f32(value).to_f32()),
        DType::F16 => f64::from(half::f16::from_f32(value).to_f32()),
        _ => f64::from(value),
    }
}

impl DebertaModel {
    fn new(cfg: &Config, settings: Settings, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let e = settings.embedding_size;
        let heads = cfg.num_attention_heads;
        let d = settings.head_dim;
        let all = heads * d;
        let eps = settings.eps;
        let base = vb.pp("deberta");
        let emb = base.pp("embeddings");
        let enc = base.pp("encoder");

        let relative = settings.relative.map(|(positions, _, _)| positions);
        let table = match relative {
            Some(positions) => {
                let table = enc
                    .pp("rel_embeddings")
                    .get((positions.table_rows(), h), "weight")?;
                Some(if settings.norm_relative {
                    layer_norm(enc.pp("LayerNorm"), h, eps)?.forward(&table)?
                } else {
                    table
                })
            }
            None => None,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = enc.pp(format!("layer.{i}"));
                let a = l.pp("attention.self");
                let query = linear(a.pp("query_proj"), h, all, true)?;
                let key = linear(a.pp("key_proj"), h, all, true)?;
                let (c2p_table, p2c_table) = match (&table, settings.relative) {
                    (Some(table), Some((_, c2p, p2c))) => {
                        let own = |name: &str| linear(a.pp(name), h, all, true);
                        let c2p_table = match (c2p, settings.share_att_key) {
                            (false, _) => None,
                            (true, true) => Some(relative_table(&key, table, heads, d)?),
                            (true, false) => {
                                Some(relative_table(&own("pos_key_proj")?, table, heads, d)?)
                            }
                        };
                        let p2c_table = match (p2c, settings.share_att_key) {
                            (false, _) => None,
                            (true, true) => Some(relative_table(&query, table, heads, d)?),
                            (true, false) => {
                                Some(relative_table(&own("pos_query_proj")?, table, heads, d)?)
                            }
                        };
                        (c2p_table, p2c_table)
                    }
                    _ => (None, None),
                };
                Ok(Layer {
                    attention: Attention {
                        query,
                        key,
                        value: linear(a.pp("value_proj"), h, all, true)?,
                        c2p_table,
                        p2c_table,
                        out: linear(l.pp("attention.output.dense"), h, h, true)?,
                        out_norm: layer_norm(l.pp("attention.output.LayerNorm"), h, eps)?,
                    },
                    intermediate: linear(
                        l.pp("intermediate.dense"),
                        h,
                        cfg.intermediate_size,
                        true,
                    )?,
                    output: linear(l.pp("output.dense"), cfg.intermediate_size, h, true)?,
                    out_norm: layer_norm(l.pp("output.LayerNorm"), h, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let conv = match settings.conv {
            Some(conv) => {
                let c = enc.pp("conv");
                Some(Conv {
                    weight: c
                        .pp("conv")
                        .get((h, h / conv.groups, conv.kernel), "weight")?,
                    bias: c.pp("conv").get(h, "bias")?,
                    norm: layer_norm(c.pp("LayerNorm"), h, eps)?,
                    settings: conv,
                })
            }
            None => None,
        };
        let type_vocab = cfg.type_vocab_size.unwrap_or(0);
        let position_biased = cfg.position_biased_input.unwrap_or(true);
        let scale = ((d * settings.scale_factor) as f32).sqrt();
        Ok(Self {
            words: embedding(emb.pp("word_embeddings"), cfg.vocab_size, e)?,
            positions: if position_biased {
                Some(embedding(
                    emb.pp("position_embeddings"),
                    settings.max_positions,
                    e,
                )?)
            } else {
                None
            },
            token_types: match type_vocab {
                0 => None,
                n => Some(embedding(emb.pp("token_type_embeddings"), n, e)?),
            },
            embed_proj: if e == h {
                None
            } else {
                Some(linear(emb.pp("embed_proj"), e, h, false)?)
            },
            embed_norm: layer_norm(emb.pp("LayerNorm"), h, eps)?,
            layers,
            conv,
            relative,
            pooler: linear(vb.pp("pooler.dense"), h, h, true)?,
            classifier: linear(vb.pp("classifier"), h, settings.num_labels, true)?,
            act: settings.act,
            pooler_act: settings.pooler_act,
            heads,
            head_dim: d,
            inv_scale: 1.0 / rounded_to(scale, vb.dtype()),
            pad_id: cfg.pad_token_id.unwrap_or(0),
            max_positions: settings.max_positions,
            num_labels: settings.num_labels,
        })
    }

    /// Word (+ absolute position) (+ token type) embeddings of the real tokens, projected
    /// to the hidden size and normalized: `[t, h]`.
    fn embed(&self, batch: &PaddedBatch, layout: &Batch) -> Result<Tensor> {
        let device = batch.ids.device();
        let mut x = self.words.forward(&layout.packing.pack(&batch.ids)?)?;
        if let Some(positions) = &self.positions {
            let ids: Vec<u32> = batch.lengths.iter().flat_map(|&l| 0..l as u32).collect();
            let count = ids.len();
            x = (x + positions.forward(&Tensor::from_vec(ids, count, device)?)?)?;
        }
        if let Some(types) = &self.token_types {
            x = (x + types.forward(&layout.packing.pack(&batch.type_ids)?)?)?;
        }
        if let Some(proj) = &self.embed_proj {
            x = proj.forward(&x)?;
        }
        self.embed_norm.forward(&x)
    }

    fn forward(&self, sequences: &[&Sequence]) -> Result<Tensor> {
        let device = self.words.embeddings().device();
        let padded = PaddedBatch::new(sequences, self.pad_id, device)?;
        let s = padded.seq_len;
        // The convolution reads the padded layout, where padding must be zeros.
        let has_padding = padded.lengths.iter().any(|&l| l != s);
        let real_rows = if has_padding && self.conv.is_some() {
            let rows: Vec<f32> = padded
                .lengths
                .iter()
                .flat_map(|&l| (0..s).map(move |p| f32::from(u8::from(p < l))))
                .collect();
            Some(Tensor::from_vec(rows, (sequences.len(), s, 1), device)?)
        } else {
            None
        };
        let batch = Batch {
            packing: Packing::new(&padded.lengths, s, device)?,
            on_packed_rows: packed_attention::applies(device, self.words.embeddings().dtype()),
            segments: Segments::plain(&padded.lengths),
            window: self.relative.map(|positions| positions.window(s)),
            batch: sequences.len(),
            seq_len: s,
            real_rows,
            key_mask: padding_mask(&padded.lengths, s, device)?,
        };
        let embedded = self.embed(&padded, &batch)?;
        // The padded layout picks the relative terms by flat index: for every query (all
        // layers but the last) and for the first (the last layer: the head reads [CLS]).
        let last = self.layers.len().saturating_sub(1);
        let padded_indices = |queries: usize, wanted: bool| match &batch.window {
            Some(window) if wanted && !batch.on_packed_rows => {
                window.gather_indices(queries, s, device).map(Some)
            }
            _ => Ok(None),
        };
        let every = padded_indices(s, last > 0)?;
        let first = padded_indices(1, true)?;
        let mut x = embedded.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let first_only = i == last;
            let queries = Queries {
                first_only,
                padded_indices: if first_only {
                    first.as_ref()
                } else {
                    every.as_ref()
                },
            };
            let rows = if first_only {
                batch.packing.first_rows(&x)?
            } else {
                x.clone()
            };
            let a = &layer.attention;
            let context = self.attend(a, &rows, &x, &batch, &queries)?;
            let h = a.out_norm.forward(&a.out.forward_add(&context, &rows)?)?;
            let inner = self.act.apply(&layer.intermediate.forward(&h)?)?;
            x = layer
                .out_norm
                .forward(&layer.output.forward_add(&inner, &h)?)?;
            if let (0, Some(conv)) = (i, &self.conv) {
                x = conv.forward(&embedded, &x, &batch, first_only)?;
            }
        }
        let cls = if self.layers.is_empty() {
            batch.packing.first_rows(&x)?
        } else {
            x
        };
        let pooled = self.pooler_act.apply(&self.pooler.forward(&cls)?)?;
        self.classifier.forward(&pooled)
    }

    /// Disentangled self-attention of `rows` (packed rows, or each sequence's first)
    /// over all of `x`: content scores plus the c2p and p2c terms, each divided by the
    /// same scale; padding never seen. Returns rows like `rows`.
    fn attend(
        &self,
        a: &Attention,
        rows: &Tensor,
        x: &Tensor,
        batch: &Batch,
        queries: &Queries,
    ) -> Result<Tensor> {
        let q = a.query.forward(rows)?;
        let k = a.key.forward(x)?;
        let v = a.value.forward(x)?;
        if batch.on_packed_rows {
            self.attend_packed(a, &q, &k, &v, batch, queries.first_only)
        } else {
            self.attend_padded(a, &q, &k, &v, batch, queries)
        }
    }

    /// A relative term's products: `of`'s rows (`[.., heads * d]`) with the part of
    /// `table` the batch reads, scaled: `[heads, rows, window.rows]`.
    fn relative_products(
        &self,
        table: Option<&Tensor>,
        of: &Tensor,
        window: &RelativeWindow,
    ) -> Result<Option<Tensor>> {
        let Some(table) = table else {
            return Ok(None);
        };
        let part = table
            .narrow(2, window.first_row, window.rows)?
            .contiguous()?;
        let product = heads_first(of, self.heads, self.head_dim)?.matmul(&part)?;
        (product * self.inv_scale).map(Some)
    }

    /// On the CPU in f32: straight on the packed rows, the relative terms added to each
    /// score as it is formed (src/model/packed_attention.rs).
    fn attend_packed(
        &self,
        a: &Attention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: &Batch,
        first_only: bool,
    ) -> Result<Tensor> {
        let spec = Spec {
            heads: self.heads,
            kv_heads: self.heads,
            head_dim: self.head_dim,
            scale: self.inv_scale as f32,
            softcap: None,
            keys: KeySpan::All,
        };
        let queries = if first_only {
            packed_attention::Queries::First
        } else {
            packed_attention::Queries::Every
        };
        let (c2p, p2c) = match &batch.window {
            Some(window) => (
                self.relative_products(a.c2p_table.as_ref(), q, window)?,
                self.relative_products(a.p2c_table.as_ref(), k, window)?,
            ),
            None => (None, None),
        };
        let bias = batch.window.as_ref().map(|window| RelativeBias {
            c2p: c2p.as_ref(),
            p2c: p2c.as_ref(),
            window,
        });
        packed_attention::attend_biased(&spec, &batch.segments, queries, q, k, v, bias.as_ref())?
            .ok_or_else(packed_attention::refused)
    }

    /// Elsewhere (a GPU, half types): on the padded layout, each relative term picked
    /// from its products by flat index and added to the mask in f32.
    fn attend_padded(
        &self,
        a: &Attention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: &Batch,
        queries: &Queries,
    ) -> Result<Tensor> {
        let (heads, d) = (self.heads, self.head_dim);
        let (b, s) = (batch.batch, batch.seq_len);
        let q = if queries.first_only {
            q.unsqueeze(1)?
        } else {
            batch.packing.unpack(q)?
        };
        let n = q.dim(1)?;
        let k = batch.packing.unpack(k)?;
        let v = batch.packing.unpack(v)?;
        let mut mask = batch.key_mask.clone();
        if let (Some(window), Some((c2p_index, p2c_index))) =
            (&batch.window, queries.padded_indices)
        {
            let pick = |product: Tensor, rows: usize, index: &Tensor| -> Result<Tensor> {
                product
                    .reshape((heads, b, rows * window.rows))?
                    .index_select(index, 2)?
                    .reshape((heads, b, n, s))?
                    .to_dtype(DType::F32)
            };
            let c2p = self.relative_products(a.c2p_table.as_ref(), &q, window)?;
            let p2c = self.relative_products(a.p2c_table.as_ref(), &k, window)?;
            for term in [
                c2p.map(|t| pick(t, n, c2p_index)).transpose()?,
                p2c.map(|t| pick(t, s, p2c_index)).transpose()?,
            ]
            .into_iter()
            .flatten()
            {
                mask = term.transpose(0, 1)?.broadcast_add(&mask)?;
            }
        }
        let split = |t: &Tensor| split_heads(t, heads, d);
        let context = attention(
            &split(&q)?,
            &split(&k)?,
            &split(&v)?,
            &mask,
            self.inv_scale,
            None,
        )?;
        if queries.first_only {
            context.squeeze(1)
        } else {
            batch.packing.pack(&context)
        }
    }
}

impl RewardModel for DebertaModel {
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
        self.token_types
            .as_ref()
            .and_then(|types| types.embeddings().dims().first().copied())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The deberta-v2-conv fixture's config.json with `changes` applied.
    fn config_with(changes: serde_json::Value) -> Config {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/models/deberta-v2-conv/config.json"
        );
        let mut raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for (key, value) in changes.as_object().unwrap() {
            raw[key] = value.clone();
        }
        parse_config(&raw).unwrap()
    }

    fn refusal(changes: serde_json::Value) -> String {
        match Settings::read(&config_with(changes)) {
            Err(ModelError::Config(message)) => message,
            Err(other) => panic!("not a config error: {other}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn reads_released_spellings_and_defaults() {
        // "c2p|p2c" as released configs write it, case and spaces as transformers allows.
        let s = Settings::read(&config_with(serde_json::json!({}))).unwrap();
        assert_eq!(s.scale_factor, 3);
        let s = Settings::read(&config_with(serde_json::json!({"pos_att_type": " P2C "}))).unwrap();
        assert_eq!(s.scale_factor, 2);
        assert!(matches!(s.relative, Some((_, false, true))));
        let s = Settings::read(&config_with(serde_json::json!({"pos_att_type": ["c2p"]}))).unwrap();
        assert!(matches!(s.relative, Some((_, true, false))));
        // No conv_act: transformers' ConvLayer defaults to tanh.
        let s = Settings::read(&config_with(serde_json::json!({"conv_act": null}))).unwrap();
        assert!(matches!(s.conv.map(|c| c.act), Some(Act::Tanh)));
        // max_relative_positions < 1: the position table's size; buckets set the span.
        let s = Settings::read(&config_with(
            serde_json::json!({"max_relative_positions": -1, "position_buckets": -1}),
        ))
        .unwrap();
        assert_eq!(s.relative.map(|r| r.0.table_rows()), Some(1024));
        let s = Settings::read(&config_with(
            serde_json::json!({"relative_attention": false}),
        ))
        .unwrap();
        assert!(s.relative.is_none());
        assert_eq!(
            s.scale_factor, 3,
            "transformers scales by pos_att_type regardless"
        );
    }

    #[test]
    fn refuses_what_transformers_cannot_run() {
        assert!(refusal(serde_json::json!({"conv_kernel_size": 4})).contains("even"));
        assert!(refusal(serde_json::json!({"conv_groups": 3})).contains("does not divide"));
        assert!(refusal(serde_json::json!({"conv_act": "swiglu2"})).contains("conv_act"));
        assert!(refusal(serde_json::json!({"pooler_hidden_size": 16})).contains("pooler"));
        assert!(refusal(serde_json::json!({"position_buckets": 1})).contains("position_buckets"));
        assert!(refusal(serde_json::json!({"num_attention_heads": 5})).contains("multiple"));
    }
}
