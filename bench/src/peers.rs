//! The peers the preview proxy is compared with, each pointed at the same container port:
//! nginx as a reverse proxy (keep-alive upstream, HTTP and HTTPS with the same certificate
//! sandboxd serves) and configurable-http-proxy (JupyterHub's proxy, from npm).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::net::TcpStream;

use crate::sys::Proc;

pub async fn wait_port(addr: SocketAddr, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The nginx configuration: what a careful operator would write for a dev-server proxy.
pub fn nginx_conf(
    prefix: &Path,
    upstream: SocketAddr,
    http: SocketAddr,
    https: SocketAddr,
    cert: &Path,
    key: &Path,
) -> String {
    let p = prefix.display();
    format!(
        r#"worker_processes auto;
pid {p}/nginx.pid;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    upstream app {{
        server {upstream};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 4s;
    }}
    server {{
        listen {http};
        listen {https} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            # sandboxd tags each request with an id, to the app and back to the client: the
            # same work for both, and the same headers for the app to parse.
            proxy_set_header X-Request-Id $request_id;
            add_header X-Request-Id $request_id always;
            proxy_buffering on;
            proxy_buffer_size 16k;
            proxy_buffers 32 16k;
            proxy_busy_buffers_size 64k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"#,
        cert = cert.display(),
        key = key.display(),
    )
}

pub async fn start_nginx(
    work: &Path,
    pids: &Path,
    upstream: SocketAddr,
    http: SocketAddr,
    https: SocketAddr,
    cert: &Path,
    key: &Path,
) -> Result<Proc> {
    start_nginx_with(work, pids, upstream, http, https, cert, key, None).await
}

/// [`start_nginx`], or with `callgrind` (the folder for its dumps) one nginx process (no
/// master, no workers) under valgrind's callgrind, so that its instructions can be counted.
#[allow(clippy::too_many_arguments)]
pub async fn start_nginx_with(
    work: &Path,
    pids: &Path,
    upstream: SocketAddr,
    http: SocketAddr,
    https: SocketAddr,
    cert: &Path,
    key: &Path,
    callgrind: Option<&Path>,
) -> Result<Proc> {
    let prefix = work.join("nginx");
    std::fs::create_dir_all(prefix.join("tmp"))?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&prefix, upstream, http, https, cert, key))?;
    let mut cmd = match callgrind {
        Some(logs) => {
            let mut c = tokio::process::Command::new("valgrind");
            c.args(crate::scenarios::callgrind_args(logs, "nginx"))
                .arg("nginx");
            c
        }
        None => tokio::process::Command::new("nginx"),
    };
    let global = if callgrind.is_some() {
        "daemon off; master_process off;"
    } else {
        "daemon off;"
    };
    cmd.arg("-p")
        .arg(&prefix)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-c")
        .arg(&conf)
        .args(["-g", global]);
    let mut p = Proc::spawn("nginx", &mut cmd, pids)?;
    let within = Duration::from_secs(if callgrind.is_some() { 60 } else { 10 });
    wait_port(http, within)
        .await
        .with_context(|| std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default())?;
    wait_port(https, Duration::from_secs(10)).await?;
    p.check_alive()?;
    Ok(p)
}

pub async fn start_chp(
    chp: &Path,
    work: &Path,
    pids: &Path,
    upstream: SocketAddr,
    port: SocketAddr,
    api: SocketAddr,
) -> Result<Proc> {
    let log = std::fs::File::create(work.join("chp.log"))?;
    let mut cmd = tokio::process::Command::new(chp);
    cmd.arg("--ip")
        .arg(port.ip().to_string())
        .arg("--port")
        .arg(port.port().to_string())
        .arg("--api-ip")
        .arg(api.ip().to_string())
        .arg("--api-port")
        .arg(api.port().to_string())
        .arg("--default-target")
        .arg(format!("http://{upstream}"))
        .args(["--log-level", "error"])
        .env(
            "CONFIGPROXY_AUTH_TOKEN",
            format!("{:032x}", rand::random::<u128>()),
        )
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut p = Proc::spawn("chp", &mut cmd, pids)?;
    wait_port(port, Duration::from_secs(20)).await?;
    p.check_alive()?;
    Ok(p)
}
