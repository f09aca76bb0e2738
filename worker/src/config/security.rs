//! Kafka over TLS and SASL: dedicated flags, mapped onto librdkafka properties for the consumer
//! and the producer alike.
//!
//! What librdkafka can do depends on how it was built. rdkafka's default build (this workspace's)
//! has neither OpenSSL nor libcurl: it speaks `plaintext` and `sasl_plaintext` with `PLAIN` only.
//! `ssl`, `sasl_ssl`, the `SCRAM-SHA-*` mechanisms and `OAUTHBEARER` need a worker built with
//! `--features tls` (the container images are); OAUTHBEARER through OIDC needs `--features oidc`
//! (libcurl as well). [`KafkaSecurity::check_supported`] reads librdkafka's `builtin.features` at
//! start-up and says which build a setting needs, instead of failing later with a connection
//! error.
//!
//! The same settings can instead be given as `--kafka-property` pairs (as the Kubernetes
//! manifests do, from a Secret); setting one property both ways is refused.

use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, ValueEnum};

use super::ConfigError;

/// A secret from a flag or the environment: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    #[value(name = "sasl_plaintext")]
    SaslPlaintext,
    #[value(name = "sasl_ssl")]
    SaslSsl,
}

impl SecurityProtocol {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    fn is_sasl(self) -> bool {
        matches!(self, SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl)
    }

    fn is_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

/// `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SaslMechanism {
    #[value(name = "PLAIN")]
    Plain,
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
    #[value(name = "OAUTHBEARER")]
    OauthBearer,
}

impl SaslMechanism {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::OauthBearer => "OAUTHBEARER",
        }
    }
}

/// TLS and SASL settings. None of them set means librdkafka's default: plaintext.
#[derive(Debug, Clone, Default, Args)]
pub struct KafkaSecurity {
    /// How to reach the brokers: `plaintext`, `ssl` (TLS), `sasl_plaintext` or `sasl_ssl`.
    /// `ssl` and `sasl_ssl` need a worker built with `--features tls`.
    #[arg(long, env = "FERRY_SECURITY_PROTOCOL", value_enum, ignore_case = true)]
    pub security_protocol: Option<SecurityProtocol>,
    /// SASL mechanism, with a `sasl_*` protocol: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`
    /// (these three with `--sasl-username` and `--sasl-password`), or `OAUTHBEARER` (through
    /// OIDC client credentials, `--sasl-oauthbearer-*`). All but PLAIN need the `tls` feature.
    #[arg(long, env = "FERRY_SASL_MECHANISM", value_enum, ignore_case = true)]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name (PLAIN, SCRAM).
    #[arg(long, env = "FERRY_SASL_USERNAME")]
    pub sasl_username: Option<String>,
    /// SASL password (PLAIN, SCRAM). Prefer the environment variable, from a Secret; it is
    /// never logged.
    #[arg(long, env = "FERRY_SASL_PASSWORD", hide_env_values = true)]
    pub sasl_password: Option<Secret>,
    /// CA certificate(s) to verify the brokers with (PEM file or directory); the system's
    /// trust store when not given.
    #[arg(long, env = "FERRY_SSL_CA_LOCATION")]
    pub ssl_ca_location: Option<PathBuf>,
    /// Client certificate for mutual TLS (PEM), with `--ssl-key-location`.
    #[arg(long, env = "FERRY_SSL_CERTIFICATE_LOCATION")]
    pub ssl_certificate_location: Option<PathBuf>,
    /// Client private key for mutual TLS (PEM), with `--ssl-certificate-location`.
    #[arg(long, env = "FERRY_SSL_KEY_LOCATION")]
    pub ssl_key_location: Option<PathBuf>,
    /// Password of the client private key, if it is encrypted.
    #[arg(long, env = "FERRY_SSL_KEY_PASSWORD", hide_env_values = true)]
    pub ssl_key_password: Option<Secret>,
    /// OAUTHBEARER: the OIDC token endpoint (client-credentials grant), e.g.
    /// `https://idp.example.com/oauth2/token`. Needs the `oidc` feature.
    #[arg(long, env = "FERRY_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL")]
    pub sasl_oauthbearer_token_endpoint_url: Option<String>,
    /// OAUTHBEARER: the OIDC client id.
    #[arg(long, env = "FERRY_SASL_OAUTHBEARER_CLIENT_ID")]
    pub sasl_oauthbearer_client_id: Option<String>,
    /// OAUTHBEARER: the OIDC client secret; never logged.
    #[arg(long, env = "FERRY_SASL_OAUTHBEARER_CLIENT_SECRET", hide_env_values = true)]
    pub sasl_oauthbearer_client_secret: Option<Secret>,
    /// OAUTHBEARER: the scope to ask for, if the identity provider needs one.
    #[arg(long, env = "FERRY_SASL_OAUTHBEARER_SCOPE")]
    pub sasl_oauthbearer_scope: Option<String>,
}

impl KafkaSecurity {
    /// The librdkafka properties these flags set, for the consumer and the producer.
    pub fn properties(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        let path = |v: &PathBuf| v.display().to_string();
        if let Some(v) = self.security_protocol {
            p.push(("security.protocol", v.as_librdkafka().to_string()));
        }
        if let Some(v) = self.sasl_mechanism {
            p.push(("sasl.mechanism", v.as_librdkafka().to_string()));
            if v == SaslMechanism::OauthBearer {
                p.push(("sasl.oauthbearer.method", "oidc".to_string()));
            }
        }
        if let Some(v) = &self.sasl_username {
            p.push(("sasl.username", v.clone()));
        }
        if let Some(v) = &self.sasl_password {
            p.push(("sasl.password", v.expose().to_string()));
        }
        if let Some(v) = &self.ssl_ca_location {
            p.push(("ssl.ca.location", path(v)));
        }
        if let Some(v) = &self.ssl_certificate_location {
            p.push(("ssl.certificate.location", path(v)));
        }
        if let Some(v) = &self.ssl_key_location {
            p.push(("ssl.key.location", path(v)));
        }
        if let Some(v) = &self.ssl_key_password {
            p.push(("ssl.key.password", v.expose().to_string()));
        }
        if let Some(v) = &self.sasl_oauthbearer_token_endpoint_url {
            p.push(("sasl.oauthbearer.token.endpoint.url", v.clone()));
        }
        if let Some(v) = &self.sasl_oauthbearer_client_id {
            p.push(("sasl.oauthbearer.client.id", v.clone()));
        }
        if let Some(v) = &self.sasl_oauthbearer_client_secret {
            p.push(("sasl.oauthbearer.client.secret", v.expose().to_string()));
        }
        if let Some(v) = &self.sasl_oauthbearer_scope {
            p.push(("sasl.oauthbearer.scope", v.clone()));
        }
        p
    }

    /// The cross-field rules; `extra` are the `--kafka-property` pairs, which must not set what
    /// a flag sets.
    pub fn validate(&self, extra: &[(String, String)]) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError(m.to_string()));
        let protocol = self.security_protocol;
        let sasl = protocol.is_some_and(SecurityProtocol::is_sasl);
        let tls = protocol.is_some_and(SecurityProtocol::is_tls);
        let oauth = self.sasl_oauthbearer_token_endpoint_url.is_some()
            || self.sasl_oauthbearer_client_id.is_some()
            || self.sasl_oauthbearer_client_secret.is_some()
            || self.sasl_oauthbearer_scope.is_some();
        let credentials = self.sasl_username.is_some() || self.sasl_password.is_some();
        match (self.sasl_mechanism, sasl) {
            (Some(_), false) => return err("--sasl-mechanism needs --security-protocol sasl_plaintext or sasl_ssl"),
            (None, true) => return err("--security-protocol sasl_* needs --sasl-mechanism"),
            (None, false) if credentials || oauth => {
                return err("SASL credentials need --security-protocol sasl_* and --sasl-mechanism")
            }
            _ => {}
        }
        match self.sasl_mechanism {
            Some(SaslMechanism::Plain | SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512) => {
                if self.sasl_username.as_deref().is_none_or(str::is_empty)
                    || self.sasl_password.as_ref().is_none_or(|p| p.expose().is_empty())
                {
                    return err("--sasl-mechanism PLAIN and SCRAM-* need --sasl-username and --sasl-password");
                }
                if oauth {
                    return err("--sasl-oauthbearer-* flags need --sasl-mechanism OAUTHBEARER");
                }
            }
            Some(SaslMechanism::OauthBearer) => {
                if credentials {
                    return err(
                        "--sasl-mechanism OAUTHBEARER takes no --sasl-username or --sasl-password: \
                                use --sasl-oauthbearer-client-id and --sasl-oauthbearer-client-secret",
                    );
                }
                let Some(url) = &self.sasl_oauthbearer_token_endpoint_url else {
                    return err("--sasl-mechanism OAUTHBEARER needs --sasl-oauthbearer-token-endpoint-url");
                };
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return err("--sasl-oauthbearer-token-endpoint-url must be an http(s) URL");
                }
                if self.sasl_oauthbearer_client_id.is_none() || self.sasl_oauthbearer_client_secret.is_none() {
                    return err("--sasl-mechanism OAUTHBEARER needs --sasl-oauthbearer-client-id and \
                                --sasl-oauthbearer-client-secret");
                }
            }
            None => {}
        }
        let tls_files = self.ssl_ca_location.is_some()
            || self.ssl_certificate_location.is_some()
            || self.ssl_key_location.is_some()
            || self.ssl_key_password.is_some();
        if tls_files && !tls {
            return err("--ssl-* flags need --security-protocol ssl or sasl_ssl");
        }
        if self.ssl_certificate_location.is_some() != self.ssl_key_location.is_some() {
            return err("--ssl-certificate-location and --ssl-key-location go together (mutual TLS)");
        }
        if self.ssl_key_password.is_some() && self.ssl_key_location.is_none() {
            return err("--ssl-key-password needs --ssl-key-location");
        }
        for (key, _) in self.properties() {
            if extra
                .iter()
                .any(|(k, _)| k == key || (key == "sasl.mechanism" && k == "sasl.mechanisms"))
            {
                return Err(ConfigError(format!(
                    "--kafka-property {key} is also set by a dedicated flag: set it one way"
                )));
            }
        }
        Ok(())
    }

    /// The librdkafka features these settings need (names as in `builtin.features`).
    pub fn required_features(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self.security_protocol.is_some_and(SecurityProtocol::is_tls) {
            f.push("ssl");
        }
        match self.sasl_mechanism {
            Some(SaslMechanism::Plain) => f.push("sasl_plain"),
            Some(SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512) => f.push("sasl_scram"),
            Some(SaslMechanism::OauthBearer) => f.extend(["sasl_oauthbearer", "oidc"]),
            None => {}
        }
        f
    }

    /// Refuses settings that the linked librdkafka cannot do, given its `builtin.features`
    /// (comma-separated), naming the build that can.
    pub fn check_supported(&self, builtin: &str) -> Result<(), ConfigError> {
        let have: Vec<&str> = builtin.split(',').map(str::trim).collect();
        let missing: Vec<&str> = self
            .required_features()
            .into_iter()
            .filter(|f| !have.contains(f))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let build = if missing.contains(&"oidc") {
            "`--features oidc`"
        } else {
            "`--features tls`"
        };
        Err(ConfigError(format!(
            "this worker's librdkafka lacks {} (it has: {builtin}); build the worker with {build}",
            missing.join(", ")
        )))
    }
}

/// The linked librdkafka's `builtin.features`, e.g. `gzip,snappy,sasl,regex,lz4,sasl_plain`.
pub fn librdkafka_features() -> Result<String, ConfigError> {
    rdkafka::ClientConfig::new()
        .create_native_config()
        .and_then(|c| c.get("builtin.features"))
        .map_err(|e| ConfigError(format!("cannot read librdkafka's builtin.features: {e}")))
}

#[cfg(test)]
mod tests;
