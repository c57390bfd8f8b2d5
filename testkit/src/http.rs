//! HTTP for the tests: one GET (with request headers if need be), and the
//! Prometheus text the job serves.

use std::io::{BufRead, BufReader, Lines, Read};
use std::time::Duration;

/// Connect, read and whole-request timeout of every request.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// What a GET got.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// The `Content-Type` header ("" without one).
    pub content_type: String,
    /// Every header, names lowercase, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// An agent that returns error statuses as answers, with a timeout.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(HTTP_TIMEOUT))
        .build()
        .into()
}

/// `GET http://ADDR/PATH`, or why it got no answer.
pub fn try_get(addr: &str, path: &str) -> Result<Response, String> {
    try_get_with(addr, path, &[])
}

/// `GET http://ADDR/PATH` with these request headers (`("Authorization",
/// "Bearer ...")`), or why it got no answer.
pub fn try_get_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> Result<Response, String> {
    let mut request = agent().get(&format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut response = request
        .call()
        .map_err(|err| format!("GET http://{addr}{path}: {err}"))?;
    let headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_ascii_lowercase(), value)
        })
        .collect();
    let content_type = headers
        .iter()
        .find(|(name, _)| name == "content-type")
        .map(|(_, value)| value.clone())
        .unwrap_or_default();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|err| format!("GET http://{addr}{path}: body: {err}"))?;
    Ok(Response {
        status: response.status().as_u16(),
        content_type,
        headers,
        body,
    })
}

/// `GET http://ADDR/PATH` with these request headers; fails the test
/// without an answer.
pub fn get_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    try_get_with(addr, path, headers).unwrap_or_else(|err| panic!("{err}"))
}

/// The lines of the server-sent events at `http://ADDR/PATH`, once it
/// answered 200; reading fails once `within` has passed since the request.
pub fn sse_lines(addr: &str, path: &str, within: Duration) -> Lines<BufReader<impl Read>> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(within))
        .build()
        .into();
    let response = agent
        .get(&format!("http://{addr}{path}"))
        .call()
        .expect("SSE request");
    assert_eq!(response.status().as_u16(), 200, "GET {path}");
    BufReader::new(response.into_body().into_reader()).lines()
}

/// `GET http://ADDR/PATH`; fails the test without an answer.
pub fn get(addr: &str, path: &str) -> Response {
    try_get(addr, path).unwrap_or_else(|err| panic!("{err}"))
}

/// `GET http://ADDR/PATH`: status and body (empty for error statuses).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let response = get(addr, path);
    let body = if response.status < 400 {
        response.body
    } else {
        String::new()
    };
    (response.status, body)
}

/// A sample's value in Prometheus text: the line `NAME VALUE` (`NAME`
/// with its labels, if any, exactly as written).
pub fn parse_metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

/// A gauge or counter from the job's `/metrics` at `addr`.
pub fn metric(addr: &str, name: &str) -> Option<f64> {
    parse_metric(&get(addr, "/metrics").body, name)
}
