//! Prometheus metrics, all prefixed `warm_`.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

use super::memory;
use crate::engine::EngineObserver;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub tokenization: Histogram,
    pub queue: Histogram,
    pub inference: Histogram,
    pub batch_size: Histogram,
    pub batch_tokens: Histogram,
    pub shared_prefix_tokens: IntCounter,
    pub queue_depth: IntGauge,
    pub inputs: IntCounterVec,
    pub fusion_seconds: Gauge,
    pub fusion_bytes: Gauge,
    pub model_info: GaugeVec,
    resident_bytes: IntGauge,
    heap_in_use_bytes: IntGauge,
    heap_free_bytes: IntGauge,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        180.0,
    ]
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        };
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new("warm_requests_total", "HTTP requests by route and outcome"),
                &["route", "outcome"],
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new("warm_request_duration_seconds", "Request time by route")
                    .buckets(latency_buckets()),
                &["route"],
            )?,
            tokenization: hist(
                "warm_tokenization_duration_seconds",
                "Formatting and tokenizing one request",
                latency_buckets(),
            )?,
            queue: hist(
                "warm_queue_duration_seconds",
                "Time a request waited for its first batch",
                latency_buckets(),
            )?,
            inference: hist(
                "warm_inference_duration_seconds",
                "Forward time of the batches a request was in",
                latency_buckets(),
            )?,
            batch_size: hist(
                "warm_batch_size",
                "Sequences per forward pass",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            )?,
            batch_tokens: hist(
                "warm_batch_tokens",
                "Tokens computed per forward pass (padding included, shared prompts once)",
                vec![
                    64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0,
                ],
            )?,
            shared_prefix_tokens: IntCounter::new(
                "warm_shared_prefix_tokens_total",
                "Input tokens not computed because inputs of a batch shared their start",
            )?,
            queue_depth: IntGauge::new("warm_queue_depth", "Sequences waiting for a forward pass")?,
            inputs: IntCounterVec::new(
                Opts::new("warm_inputs_total", "Inputs scored by route"),
                &["route"],
            )?,
            fusion_seconds: Gauge::new(
                "warm_fusion_seconds",
                "Time taken to load and fuse the members",
            )?,
            fusion_bytes: Gauge::new(
                "warm_fusion_bytes_read",
                "Bytes of member weights read at start-up",
            )?,
            model_info: GaugeVec::new(
                Opts::new("warm_model_info", "The served model (value 1)"),
                &[
                    "model",
                    "architecture",
                    "combine",
                    "members",
                    "dtype",
                    "device",
                ],
            )?,
            resident_bytes: IntGauge::new(
                "warm_resident_memory_bytes",
                "Resident size of the process, read at each scrape",
            )?,
            heap_in_use_bytes: IntGauge::new(
                "warm_heap_in_use_bytes",
                "Heap bytes allocated and not freed (glibc), read at each scrape",
            )?,
            heap_free_bytes: IntGauge::new(
                "warm_heap_free_bytes",
                "Freed heap bytes kept for reuse by the next batches (glibc)",
            )?,
            registry,
        };
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.request_duration.clone()))?;
        m.registry.register(Box::new(m.tokenization.clone()))?;
        m.registry.register(Box::new(m.queue.clone()))?;
        m.registry.register(Box::new(m.inference.clone()))?;
        m.registry.register(Box::new(m.batch_size.clone()))?;
        m.registry.register(Box::new(m.batch_tokens.clone()))?;
        m.registry
            .register(Box::new(m.shared_prefix_tokens.clone()))?;
        m.registry.register(Box::new(m.queue_depth.clone()))?;
        m.registry.register(Box::new(m.inputs.clone()))?;
        m.registry.register(Box::new(m.fusion_seconds.clone()))?;
        m.registry.register(Box::new(m.fusion_bytes.clone()))?;
        m.registry.register(Box::new(m.model_info.clone()))?;
        // Absent figures (another platform or allocator) are left out rather than shown as 0.
        for (gauge, value) in m.memory_gauges(memory::read()) {
            if value.is_some() {
                m.registry.register(Box::new(gauge.clone()))?;
            }
        }
        Ok(m)
    }

    /// Each memory gauge with its figure in `reading`.
    fn memory_gauges(&self, reading: memory::MemoryReading) -> [(&IntGauge, Option<u64>); 3] {
        [
            (&self.resident_bytes, reading.resident_bytes),
            (&self.heap_in_use_bytes, reading.heap_in_use_bytes),
            (&self.heap_free_bytes, reading.heap_free_bytes),
        ]
    }

    pub fn render(&self) -> String {
        for (gauge, value) in self.memory_gauges(memory::read()) {
            if let Some(bytes) = value {
                gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl EngineObserver for Metrics {
    fn batch(&self, inputs: usize, tokens: usize, shared: usize, _seconds: f64) {
        self.batch_size.observe(inputs as f64);
        self.batch_tokens.observe(tokens as f64);
        self.shared_prefix_tokens.inc_by(shared as u64);
    }

    fn queue_depth(&self, inputs: usize) {
        self.queue_depth.set(inputs as i64);
    }
}
