//! IMDSv2: a session token, then plain GETs. Discovery reads the instance identity and
//! every ENI the metadata service shows (it lags EC2; the reconciler copes).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Empty};
use hyper::{Method, Request, StatusCode, body::Bytes};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
const TOKEN_TTL: u64 = 21_600;
/// IMDS answers locally in well under this; a slower answer means it is not there.
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("IMDS {what}")]
    Http {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "IMDS {what}: timed out after {TIMEOUT:?}; is this an EC2 instance with IMDS enabled (hop limit >= 2 for pods)?"
    )]
    Timeout { what: String },
    #[error("IMDS {what}: HTTP {status}")]
    Status { what: String, status: StatusCode },
    #[error("IMDS {path} is missing")]
    Missing { path: String },
    #[error("IMDS {what}: cannot build the request")]
    Request {
        what: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("IMDS {path}: cannot parse {value:?}")]
    Parse { path: String, value: String },
}

/// One ENI as IMDS shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniMetadata {
    pub mac: String,
    pub eni_id: String,
    pub device_index: u32,
    pub subnet_id: String,
    pub subnet_cidr: String,
    pub vpc_id: String,
    pub vpc_cidrs: Vec<String>,
    /// The ENI's primary address first, then its secondaries.
    pub ipv4s: Vec<Ipv4Addr>,
    /// Delegated /28 prefixes, as `a.b.c.d/28`.
    pub prefixes: Vec<String>,
    pub security_groups: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceMetadata {
    pub instance_id: String,
    pub instance_type: String,
    pub region: String,
    pub availability_zone: String,
    pub primary_mac: String,
    /// Sorted by device index; the primary ENI is device 0.
    pub enis: Vec<EniMetadata>,
}

pub struct Imds {
    endpoint: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    token: Option<(String, Instant)>,
}

fn lines(s: &str) -> impl Iterator<Item = &str> {
    s.lines().map(str::trim).filter(|l| !l.is_empty())
}

impl Imds {
    pub fn new(endpoint: &str) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            token: None,
        }
    }

    async fn send(
        &self,
        req: Request<Empty<Bytes>>,
        what: &str,
    ) -> Result<(StatusCode, String), ImdsError> {
        let http = |source: Box<dyn std::error::Error + Send + Sync>| ImdsError::Http {
            what: what.to_owned(),
            source,
        };
        let resp = tokio::time::timeout(TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| ImdsError::Timeout {
                what: what.to_owned(),
            })?
            .map_err(|e| http(e.into()))?;
        let status = resp.status();
        let body = tokio::time::timeout(TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| ImdsError::Timeout {
                what: what.to_owned(),
            })?
            .map_err(|e| http(e.into()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn token(&mut self) -> Result<String, ImdsError> {
        if let Some((t, expires)) = &self.token
            && Instant::now() < *expires
        {
            return Ok(t.clone());
        }
        let req = Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/latest/api/token", self.endpoint))
            .header(
                "X-aws-ec2-metadata-token-ttl-seconds",
                TOKEN_TTL.to_string(),
            )
            .body(Empty::new())
            .map_err(|source| ImdsError::Request {
                what: "token".into(),
                source,
            })?;
        let (status, body) = self.send(req, "token").await?;
        if status != StatusCode::OK {
            return Err(ImdsError::Status {
                what: "token".into(),
                status,
            });
        }
        // Renew well before expiry.
        self.token = Some((
            body.clone(),
            Instant::now() + Duration::from_secs(TOKEN_TTL / 2),
        ));
        Ok(body)
    }

    /// GET `latest/<path>`; `None` for 404 (IMDS leaves out what does not apply).
    pub async fn get(&mut self, path: &str) -> Result<Option<String>, ImdsError> {
        for attempt in 0..2 {
            let token = self.token().await?;
            let req = Request::builder()
                .uri(format!("{}/latest/{path}", self.endpoint))
                .header("X-aws-ec2-metadata-token", token)
                .body(Empty::new())
                .map_err(|source| ImdsError::Request {
                    what: path.to_owned(),
                    source,
                })?;
            let (status, body) = self.send(req, path).await?;
            match status {
                StatusCode::OK => return Ok(Some(body)),
                StatusCode::NOT_FOUND => return Ok(None),
                // The token expired under us (or IMDS restarted): one fresh try.
                StatusCode::UNAUTHORIZED if attempt == 0 => self.token = None,
                status => {
                    return Err(ImdsError::Status {
                        what: path.to_owned(),
                        status,
                    });
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    async fn need(&mut self, path: &str) -> Result<String, ImdsError> {
        self.get(path)
            .await?
            .map(|s| s.trim().to_owned())
            .ok_or_else(|| ImdsError::Missing {
                path: path.to_owned(),
            })
    }

    /// What the agent needs at start: the instance and its primary ENI only. Every ENI's
    /// details come from EC2 anyway, and each IMDS path is a round trip, so this keeps
    /// start-up flat however many ENIs are attached.
    pub async fn discover_primary(&mut self) -> Result<InstanceMetadata, ImdsError> {
        let primary_mac = self.need("meta-data/mac").await?;
        let eni = self.eni(primary_mac.trim()).await?;
        self.instance(vec![eni]).await
    }

    pub async fn discover(&mut self) -> Result<InstanceMetadata, ImdsError> {
        let mut enis = Vec::new();
        for mac in lines(&self.need("meta-data/network/interfaces/macs/").await?)
            .map(|m| m.trim_end_matches('/').to_owned())
            .collect::<Vec<_>>()
        {
            enis.push(self.eni(&mac).await?);
        }
        enis.sort_by_key(|e| e.device_index);
        self.instance(enis).await
    }

    /// The instance's identity around the ENIs already read.
    async fn instance(&mut self, enis: Vec<EniMetadata>) -> Result<InstanceMetadata, ImdsError> {
        let md = "meta-data";
        Ok(InstanceMetadata {
            instance_id: self.need(&format!("{md}/instance-id")).await?,
            instance_type: self.need(&format!("{md}/instance-type")).await?,
            region: self.need(&format!("{md}/placement/region")).await?,
            availability_zone: self
                .need(&format!("{md}/placement/availability-zone"))
                .await?,
            primary_mac: self.need(&format!("{md}/mac")).await?,
            enis,
        })
    }

    async fn eni(&mut self, mac: &str) -> Result<EniMetadata, ImdsError> {
        let base = format!("meta-data/network/interfaces/macs/{mac}");
        let device = self.need(&format!("{base}/device-number")).await?;
        let device_index = device.parse().map_err(|_| ImdsError::Parse {
            path: format!("{base}/device-number"),
            value: device.clone(),
        })?;
        let ipv4s_raw = self
            .get(&format!("{base}/local-ipv4s"))
            .await?
            .unwrap_or_default();
        let ipv4s = lines(&ipv4s_raw)
            .map(|s| {
                s.parse().map_err(|_| ImdsError::Parse {
                    path: format!("{base}/local-ipv4s"),
                    value: s.to_owned(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let list = |s: Option<String>| -> Vec<String> {
            s.as_deref()
                .map(lines)
                .into_iter()
                .flatten()
                .map(str::to_owned)
                .collect()
        };
        Ok(EniMetadata {
            mac: mac.to_owned(),
            eni_id: self.need(&format!("{base}/interface-id")).await?,
            device_index,
            subnet_id: self.need(&format!("{base}/subnet-id")).await?,
            subnet_cidr: self.need(&format!("{base}/subnet-ipv4-cidr-block")).await?,
            vpc_id: self
                .get(&format!("{base}/vpc-id"))
                .await?
                .unwrap_or_default(),
            vpc_cidrs: list(self.get(&format!("{base}/vpc-ipv4-cidr-blocks")).await?),
            ipv4s,
            prefixes: list(self.get(&format!("{base}/ipv4-prefix")).await?),
            security_groups: list(self.get(&format!("{base}/security-group-ids")).await?),
        })
    }
}
