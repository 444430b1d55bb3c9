//! Logging and tracing: one subscriber per process, optional OTLP export, and W3C trace
//! context carried in NATS headers (`traceparent`), so a trace follows a request across nodes.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{BusConfig, LogFormat};
use crate::request::header;

pub const TRACEPARENT: &str = "traceparent";

/// Libraries whose TRACE output carries secrets (headers, keys): held at DEBUG.
const QUIET_AT_TRACE: [&str; 6] = [
    "async_nats",
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
    "rustls",
];

/// Why the telemetry settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryConfigError {
    #[error("log filter {filter:?} is not valid: {reason}")]
    Log { filter: String, reason: String },
    #[error("otlp_endpoint {0:?} is not an http(s) URL (e.g. http://127.0.0.1:4318/v1/traces)")]
    Otlp(String),
}

fn log_filter(log: &str) -> Result<EnvFilter, TelemetryConfigError> {
    EnvFilter::try_new(log).map_err(|e| TelemetryConfigError::Log {
        filter: log.to_string(),
        reason: e.to_string(),
    })
}

/// Checks `log` and `otlp_endpoint` without installing anything: a binary refuses to start
/// on either (exit 64) rather than log at another level or export nowhere.
pub fn check(cfg: &BusConfig) -> Result<(), TelemetryConfigError> {
    log_filter(&cfg.log)?;
    if let Some(e) = cfg.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        let rest = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
            .ok_or_else(|| TelemetryConfigError::Otlp(e.to_string()))?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if host.is_empty() || e.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TelemetryConfigError::Otlp(e.to_string()));
        }
    }
    Ok(())
}

/// Keeps the tracer provider alive; flushes spans on drop.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Installs the global subscriber: env filter from `log`, text or JSON lines on stderr, and an
/// OpenTelemetry layer (spans get W3C ids; exported over OTLP/HTTP when `otlp_endpoint` is set).
/// Calling it twice in one process is harmless (the second install is ignored).
pub fn init(cfg: &BusConfig, service: &str) -> anyhow::Result<TelemetryGuard> {
    check(cfg)?;
    let mut builder = SdkTracerProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name(service.to_string())
            .build(),
    );
    if let Some(endpoint) = cfg.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build OTLP exporter for {endpoint}: {e}"))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer(service.to_string());
    let mut filter = log_filter(&cfg.log)?;
    if cfg.log.contains("trace") {
        // async-nats logs whole messages, headers included, at TRACE: that would put bearer
        // tokens in the log; the HTTP stack does the same with provider API keys and engine
        // requests. Secrets are never logged, so these libraries stop at DEBUG.
        for quiet in QUIET_AT_TRACE {
            if let Ok(d) = format!("{quiet}=debug").parse() {
                filter = filter.add_directive(d);
            }
        }
    }
    // Spans become OpenTelemetry spans only when they are exported: building them costs
    // microseconds per request. Without export, `traceparent` is forwarded as received.
    let otel = cfg
        .otlp_endpoint
        .as_deref()
        .filter(|e| !e.is_empty())
        .map(|_| tracing_opentelemetry::layer().with_tracer(tracer));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    // The log lines do not carry the per-request span: formatting its fields on every request
    // costs more than the rest of the request path. Failed requests are logged with their
    // subject, status and detail; the span itself goes to OpenTelemetry when exported.
    let not_request_span =
        tracing_subscriber::filter::filter_fn(|m| !(m.is_span() && m.name() == "request"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = match cfg.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(not_request_span),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr)
                    .with_filter(not_request_span),
            )
            .try_init(),
    };
    Ok(TelemetryGuard { provider })
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        header(Some(self.0), key)
    }
    fn keys(&self) -> Vec<&str> {
        // Only the W3C keys matter to the propagator.
        [TRACEPARENT, "tracestate"]
            .into_iter()
            .filter(|k| self.get(k).is_some())
            .collect()
    }
}

/// Sets the current span's parent from incoming headers.
pub fn set_parent_from(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if let Some(h) = headers.filter(|h| header(Some(h), TRACEPARENT).is_some()) {
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(h));
        let _ = span.set_parent(cx);
    }
}

/// Writes the current span's trace context into outgoing headers. Returns false when there is
/// no active trace (no OpenTelemetry layer installed), so callers can forward what they got.
pub fn inject_current(headers: &mut HeaderMap) -> bool {
    use opentelemetry::trace::TraceContextExt;
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return false;
    }
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    true
}

/// The `traceparent` of the current span, if any.
pub fn current_traceparent() -> Option<String> {
    let mut h = HeaderMap::new();
    inject_current(&mut h)
        .then(|| h.get(TRACEPARENT).map(|v| v.as_str().to_string()))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_log_filters_and_otlp_endpoints_are_refused() {
        let ok = |log: &str, otlp: Option<&str>| {
            check(&BusConfig {
                log: log.into(),
                otlp_endpoint: otlp.map(Into::into),
                ..Default::default()
            })
        };
        assert!(ok("info,tether_bus=debug", None).is_ok());
        assert!(ok("info", Some("")).is_ok());
        assert!(ok("info", Some("http://127.0.0.1:4318/v1/traces")).is_ok());
        assert!(ok("info", Some("https://otel.example:4318")).is_ok());
        for bad in ["info,[", "tether_bus=loud"] {
            assert!(
                matches!(ok(bad, None), Err(TelemetryConfigError::Log { .. })),
                "{bad}"
            );
        }
        for bad in [
            "127.0.0.1:4318",
            "ftp://x",
            "http://",
            "http:// x",
            "not a url",
        ] {
            assert!(
                matches!(ok("info", Some(bad)), Err(TelemetryConfigError::Otlp(_))),
                "{bad}"
            );
        }
    }
}
