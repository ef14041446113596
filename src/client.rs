//! The mTLS gRPC client shared by `lease`, `admin`, `sidecar` and `demo`.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity as TlsIdentity};

use crate::error::{Error, Result};
use crate::pb;

/// Where the broker is and which certificate we present.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientOpts {
    /// Broker address, e.g. https://127.0.0.1:7443
    #[arg(
        long,
        env = "CREDBROKER_ADDR",
        default_value = "https://127.0.0.1:7443"
    )]
    pub addr: String,
    /// CA certificate that signed the broker's server certificate (PEM)
    #[arg(long, env = "CREDBROKER_CA")]
    pub ca: PathBuf,
    /// Our client certificate (PEM)
    #[arg(long, env = "CREDBROKER_CERT")]
    pub cert: PathBuf,
    /// Our client key (PEM)
    #[arg(long, env = "CREDBROKER_KEY")]
    pub key: PathBuf,
}

fn read(what: &str, path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Config(format!("--{what} {}: {e}", path.display())))
}

impl ClientOpts {
    /// Opens a channel. The connection is made lazily, so this only fails
    /// on bad files or a malformed address.
    pub fn channel(&self) -> Result<Channel> {
        crate::server::tls::install_crypto_provider();
        let addr = if self.addr.contains("://") {
            self.addr.clone()
        } else {
            format!("https://{}", self.addr)
        };
        let uri: http::Uri = addr
            .parse()
            .map_err(|e| Error::Config(format!("--addr {addr:?}: {e}")))?;
        let host = uri
            .host()
            .unwrap_or("localhost")
            .trim_matches(['[', ']'])
            .to_string();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca", &self.ca)?))
            .identity(TlsIdentity::from_pem(
                read("cert", &self.cert)?,
                read("key", &self.key)?,
            ))
            .domain_name(host);
        let channel = Channel::builder(uri)
            .tls_config(tls)
            .map_err(|e| Error::Config(format!("client TLS: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .connect_lazy();
        Ok(channel)
    }

    pub fn broker(&self) -> Result<pb::broker_client::BrokerClient<Channel>> {
        Ok(pb::broker_client::BrokerClient::new(self.channel()?))
    }

    pub fn admin(&self) -> Result<pb::admin_client::AdminClient<Channel>> {
        Ok(pb::admin_client::AdminClient::new(self.channel()?))
    }
}

/// Formats a gRPC status for a person: code and message, nothing else
/// (tonic's Display adds metadata and details).
pub fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
