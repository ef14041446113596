//! The broker connection, rebuilt when the client certificate files change
//! on disk: SPIFFE/cert-manager certificates live for hours, the sidecar
//! for weeks, and an expired certificate fails at the next handshake.

use std::time::SystemTime;

use crate::client::ClientOpts;
use crate::error::Result;

use super::BrokerClient;

/// Size and modification time of the CA, certificate and key files.
type Stamp = [Option<(u64, SystemTime)>; 3];

pub struct Connector {
    opts: ClientOpts,
    stamp: Stamp,
    client: BrokerClient,
}

impl Connector {
    /// Fails on unreadable files or a bad address (a config error at start).
    pub fn new(opts: ClientOpts) -> Result<Self> {
        let stamp = stamp(&opts);
        let client = opts.broker()?;
        Ok(Connector {
            opts,
            stamp,
            client,
        })
    }

    /// Reconnects with the files' current contents if they changed since
    /// the last look (called before each round of broker calls). Files that
    /// do not load keep the old connection, and the next look tries again;
    /// a certificate and key replaced one after the other change the stamp
    /// twice, so the pair that ends up on disk is the one used.
    pub fn refresh(&mut self) {
        let now = stamp(&self.opts);
        if now == self.stamp {
            return;
        }
        match self.opts.broker() {
            Ok(client) => {
                self.client = client;
                self.stamp = now;
                tracing::info!(cert = %self.opts.cert.display(), "client certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "client certificate files changed but do not load")
            }
        }
    }

    pub fn client(&self) -> BrokerClient {
        self.client.clone()
    }
}

fn stamp(opts: &ClientOpts) -> Stamp {
    [&opts.ca, &opts.cert, &opts.key].map(|p| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)))
    })
}
