//! Reaching the manager's operator API, which listens on loopback inside the manager's
//! network namespace (plain HTTP must stay on loopback, docs/daemons.md).
//!
//! - [`connect_in_netns`]: a TCP connection opened from inside a named network
//!   namespace (a short-lived thread enters it with setns; the socket keeps the
//!   namespace it was created in, so any thread may use it afterwards).
//! - [`Forwarder`]: a listener on 127.0.0.1 of this machine whose connections are
//!   relayed into the manager namespace, so `kvmha host list`, curl and a browser
//!   on the machine reach the lab's manager at `http://127.0.0.1:PORT`.
//! - [`ApiClient`]: a minimal blocking HTTP/1.1 client (one request per connection)
//!   with the operator token; the token is sent, never logged or put into errors.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use serde_json::Value;

use crate::error::{LabError, Result};

/// Bound on one API call, connect to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a TCP connection to `address` from inside the network namespace `namespace`
/// (a name under /run/netns).
pub fn connect_in_netns(namespace: &str, address: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let path = format!("/run/netns/{namespace}");
    let file = File::open(&path).map_err(|error| LabError::io(&path, error))?;
    let connecting = thread::Builder::new()
        .name("netns-connect".to_string())
        .spawn(move || -> std::io::Result<TcpStream> {
            // Only this short-lived thread changes namespace.
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            TcpStream::connect_timeout(&address, timeout)
        })
        .map_err(|error| LabError::io("netns-connect thread", error))?;
    connecting.join().map_err(|_| LabError::Config("the netns-connect thread panicked".to_string()))?.map_err(|error| {
        LabError::Command { command: format!("connect {address} in {namespace}"), detail: error.to_string() }
    })
}

/// Relays 127.0.0.1:PORT of this machine to an address inside a namespace.
#[derive(Debug)]
pub struct Forwarder {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Listens on `127.0.0.1:preferred_port` if free, else on any free port.
    pub fn start(namespace: &str, target: SocketAddr, preferred_port: u16) -> Result<Forwarder> {
        let listener = TcpListener::bind(("127.0.0.1", preferred_port))
            .or_else(|_| TcpListener::bind(("127.0.0.1", 0)))
            .map_err(|error| LabError::io("127.0.0.1 listener", error))?;
        let local = listener.local_addr().map_err(|error| LabError::io("127.0.0.1 listener", error))?;
        // Non-blocking accept, so the loop sees `stop` within a tick.
        listener.set_nonblocking(true).map_err(|error| LabError::io("127.0.0.1 listener", error))?;
        let stop = Arc::new(AtomicBool::new(false));
        let namespace = namespace.to_string();
        let stopping = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("api-forwarder".to_string())
            .spawn(move || {
                while !stopping.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let namespace = namespace.clone();
                            let _ = thread::Builder::new()
                                .name("api-relay".to_string())
                                .spawn(move || relay(client, &namespace, target));
                        }
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(20));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
            .map_err(|error| LabError::io("api-forwarder thread", error))?;
        Ok(Forwarder { local, stop, thread: Some(thread) })
    }

    pub fn local_address(&self) -> SocketAddr {
        self.local
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.local)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Copies both directions until either side closes.
fn relay(client: TcpStream, namespace: &str, target: SocketAddr) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = connect_in_netns(namespace, target, Duration::from_secs(5)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let (Ok(mut client_reader), Ok(mut server_writer)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let upstream = thread::spawn(move || {
        let _ = std::io::copy(&mut client_reader, &mut server_writer);
        let _ = server_writer.shutdown(Shutdown::Write);
    });
    let (mut server_reader, mut client_writer) = (server, client);
    let _ = std::io::copy(&mut server_reader, &mut client_writer);
    let _ = client_writer.shutdown(Shutdown::Both);
    let _ = upstream.join();
}

/// An HTTP answer: status and body.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

impl ApiResponse {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }
}

/// The manager's operator API, through a namespace: every call opens its own connection.
#[derive(Clone)]
pub struct ApiClient {
    namespace: String,
    address: SocketAddr,
    token: String,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of every debug print.
        f.debug_struct("ApiClient").field("namespace", &self.namespace).field("address", &self.address).finish()
    }
}

impl ApiClient {
    pub fn new(namespace: &str, address: SocketAddr, token: &str) -> ApiClient {
        ApiClient { namespace: namespace.to_string(), address, token: token.to_string() }
    }

    pub fn get(&self, path: &str) -> Result<ApiResponse> {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<ApiResponse> {
        self.request("POST", path, Some(&body.to_string()))
    }

    /// GET that must answer 2xx with JSON.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        let response = self.get(path)?;
        if !response.is_success() {
            return Err(LabError::Command {
                command: format!("GET {path}"),
                detail: format!("status {}: {}", response.status, first_line(&response.body)),
            });
        }
        response.json().ok_or_else(|| LabError::Command {
            command: format!("GET {path}"),
            detail: format!("not JSON: {}", first_line(&response.body)),
        })
    }

    /// POST that must answer 2xx.
    pub fn post_ok(&self, path: &str, body: &Value) -> Result<ApiResponse> {
        let response = self.post(path, body)?;
        if !response.is_success() {
            return Err(LabError::Command {
                command: format!("POST {path}"),
                detail: format!("status {}: {}", response.status, first_line(&response.body)),
            });
        }
        Ok(response)
    }

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<ApiResponse> {
        let command = format!("{method} {path}");
        let failed = |detail: String| LabError::Command { command: command.clone(), detail };
        let mut stream = connect_in_netns(&self.namespace, self.address, REQUEST_TIMEOUT)?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(|error| failed(error.to_string()))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(|error| failed(error.to_string()))?;
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.address,
            self.token,
            body.len()
        );
        stream.write_all(request.as_bytes()).map_err(|error| failed(error.to_string()))?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(|error| failed(error.to_string()))?;
        parse_response(&raw).ok_or_else(|| failed("malformed HTTP response".to_string()))
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

/// Parses a whole `Connection: close` response (Content-Length, chunked or to EOF).
fn parse_response(raw: &[u8]) -> Option<ApiResponse> {
    let split = raw.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            let length: usize = value.parse().ok()?;
            body = body.get(..length)?;
        } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Some(ApiResponse { status, body: String::from_utf8_lossy(&body).into_owned() })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|window| window == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_with_length_chunks_or_eof() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]";
        let parsed = parse_response(plain).expect("plain");
        assert_eq!((parsed.status, parsed.body.as_str()), (200, "[]"));
        let chunked = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"a\r\n2\r\n\":\r\n0\r\n\r\n";
        let parsed = parse_response(chunked).expect("chunked");
        assert_eq!((parsed.status, parsed.body.as_str()), (404, "{\"a\":"));
        assert!(parse_response(b"garbage").is_none());
    }
}
