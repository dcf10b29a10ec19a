//! TLS through the real binary: a certificate made in the test, a generation over HTTPS on HTTP/2 and HTTP/1.1,
//! the plain-HTTP redirect listener, a SIGHUP that swaps in a new certificate for new connections, and one that
//! keeps the old certificate when the new files are broken. A bad key is refused at start.

use std::time::Instant;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::json;

use crate::support::{TEST_TIMEOUT, start_binary};

/// A CA and a leaf for localhost/127.0.0.1 signed by it: (CA PEM, leaf cert PEM, leaf key PEM).
fn pki(name: &str) -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("easel test CA {name}"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    (ca_cert.pem(), leaf_cert.pem(), leaf_key.serialize_pem())
}

fn client(ca_pem: &str, http2: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .timeout(TEST_TIMEOUT)
        .pool_max_idle_per_host(0);
    if !http2 {
        b = b.http1_only();
    }
    b.build().unwrap()
}

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_config(dir: &std::path::Path, redirect: &str) {
    std::fs::write(
        dir.join("easel.yaml"),
        format!("server:\n  tls: {{cert: cert.pem, key: key.pem{redirect}}}\nbackends:\n  sim: {{kind: simulated}}\nmodels:\n  - {{id: pic, backends: [sim], default_size: 16x16}}\n"),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_on_h2_and_http1_redirects_plain_http_and_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, cert1, key1) = pki("one");
    std::fs::write(dir.path().join("cert.pem"), &cert1).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key1).unwrap();
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let redirect_addr = plain.local_addr().unwrap();
    drop(plain);
    write_config(dir.path(), &format!(", redirect_http: '{redirect_addr}'"));
    let (child, url) = start_binary(dir.path(), &[]);
    let pid = child.id();
    let _child = Killed(child);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    for http2 in [true, false] {
        let resp = client(&ca1, http2)
            .post(format!("{url}/v1/images/generations"))
            .json(&json!({"model": "pic", "prompt": "over tls", "response_format": "b64_json"}))
            .send()
            .await
            .unwrap();
        let want = if http2 { reqwest::Version::HTTP_2 } else { reqwest::Version::HTTP_11 };
        assert_eq!((resp.status().as_u16(), resp.version()), (200, want));
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(body["data"][0]["b64_json"].is_string(), "{body}");
    }
    // Plain HTTP to the TLS port is not answered as HTTP.
    let plain_to_tls = reqwest::get(url.replace("https://", "http://") + "/healthz").await;
    assert!(plain_to_tls.is_err() || plain_to_tls.unwrap().status() != 200);
    // The redirect listener sends every request to the same path over HTTPS.
    let no_follow = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = no_follow.get(format!("http://{redirect_addr}/v1/models?x=1")).send().await.unwrap();
    assert_eq!(resp.status(), 308);
    let port = url.rsplit(':').next().unwrap();
    assert_eq!(resp.headers()["location"], format!("https://127.0.0.1:{port}/v1/models?x=1"));

    // A broken pair on SIGHUP: the old certificate stays.
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    let hup = |pid: u32| std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap();
    assert!(hup(pid).success());
    // A new pair on SIGHUP: new connections get it (the CA of the old one no longer verifies them).
    let (ca2, cert2, key2) = pki("two");
    // Make sure the refused reload happened first: the old certificate is still served after it.
    assert_eq!(client(&ca1, false).get(format!("{url}/healthz")).send().await.unwrap().status(), 200);
    std::fs::write(dir.path().join("cert.pem"), &cert2).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key2).unwrap();
    assert!(hup(pid).success());
    let deadline = Instant::now() + TEST_TIMEOUT;
    loop {
        if let Ok(r) = client(&ca2, false).get(format!("{url}/healthz")).send().await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(Instant::now() < deadline, "the new certificate was never served");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(client(&ca1, false).get(format!("{url}/healthz")).send().await.is_err(), "the old CA no longer verifies");
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, _) = pki("one");
    let (_, _, other_key) = pki("two");
    std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), other_key).unwrap();
    write_config(dir.path(), "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("EASEL_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not belong to server.tls.cert"), "{err}");
}
