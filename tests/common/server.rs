//! Spawning the real `warm serve` on an ephemeral port and talking HTTP to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub base: String,
    pub log: std::sync::Mutex<mpsc::Receiver<String>>,
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// Runs `warm serve ARGS` expecting it to fail at start-up: checks the exit code is 1 and
/// returns its stderr.
pub fn start_failure(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_warm"))
        .arg("serve")
        .args(args)
        .args(["--port", "0", "--host", "127.0.0.1"])
        .env_remove("WARM_MODEL")
        .output()
        .expect("run warm serve");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

impl Server {
    /// Starts `warm serve ARGS --port 0 --json-logs` and waits until it listens.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_warm"))
            .arg("serve")
            .args(args)
            .args(["--host", "127.0.0.1", "--port", "0", "--json-logs"])
            .env_remove("WARM_MODEL")
            .env("WARM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn warm serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Owned by the guard from here on, so a failed start still kills the process.
        let mut server = Self {
            child,
            base: String::new(),
            log: std::sync::Mutex::new(rx),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = server
                .log
                .lock()
                .unwrap()
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("warm serve printed no 'listening' line");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(local) = v["fields"]["local"].as_str() {
                server.base = format!("http://{local}");
                return server;
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Polls /health until 200.
    pub fn wait_ready(&self) {
        let client = reqwest::blocking::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(r) = client.get(self.url("/health")).send() {
                if r.status() == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("warm serve did not become ready");
    }

    pub fn started(args: &[&str]) -> Self {
        let s = Self::start(args);
        s.wait_ready();
        s
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let r = reqwest::blocking::Client::new()
            .post(self.url(path))
            .json(body)
            .send()
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(serde_json::Value::Null))
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let r = reqwest::blocking::get(self.url(path)).expect("request");
        (r.status().as_u16(), r.text().unwrap_or_default())
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), 15);
        self.child.wait().expect("wait")
    }
}

fn unsafe_kill(pid: u32, signal: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
