//! A real browser for the dashboard's tests: Debian's Chromium, headless,
//! driven over the DevTools protocol (a WebSocket of JSON commands). Pages
//! are read and worked with JavaScript, typing goes through
//! `Input.insertText`, and screenshots are saved as test artefacts.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

pub struct Browser {
    child: Child,
    page: WebSocket<TcpStream>,
    next: u64,
    shots: PathBuf,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(url: &str) -> WebSocket<TcpStream> {
    let rest = url.strip_prefix("ws://").expect("a ws:// address");
    let host = rest.split('/').next().unwrap();
    let stream = TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    tungstenite::client(url, stream).unwrap().0
}

/// Sends one command and waits for its answer (events in between are
/// dropped).
fn call(ws: &mut WebSocket<TcpStream>, id: u64, method: &str, params: Value) -> Value {
    let msg = json!({ "id": id, "method": method, "params": params });
    ws.send(Message::text(msg.to_string())).unwrap();
    loop {
        let Message::Text(t) = ws.read().unwrap() else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["id"] == id {
            assert!(v["error"].is_null(), "{method}: {}", v["error"]);
            return v["result"].clone();
        }
    }
}

impl Browser {
    /// Starts Chromium; screenshots go to `shots`.
    pub fn start(shots: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium: install Debian's `chromium` (cargo xtask test does)");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let browser_url = loop {
            let line = lines
                .next()
                .expect("chromium exited before it listened")
                .unwrap();
            if let Some(u) = line.strip_prefix("DevTools listening on ") {
                break u.trim().to_string();
            }
        };
        // Keep reading what it says, so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let mut b = connect(&browser_url);
        let target = call(
            &mut b,
            1,
            "Target.createTarget",
            json!({ "url": "about:blank" }),
        );
        let id = target["targetId"].as_str().unwrap();
        let host = browser_url
            .strip_prefix("ws://")
            .unwrap()
            .split('/')
            .next()
            .unwrap();
        let page = connect(&format!("ws://{host}/devtools/page/{id}"));
        std::fs::create_dir_all(shots).unwrap();
        let mut browser = Browser {
            child,
            page,
            next: 1,
            shots: shots.to_path_buf(),
            _profile: profile,
        };
        browser.cmd("Page.enable", json!({}));
        browser
    }

    fn cmd(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        call(&mut self.page, self.next, method, params)
    }

    /// The value of a JavaScript expression (awaited if a promise).
    pub fn eval(&mut self, js: &str) -> Value {
        let r = self.cmd(
            "Runtime.evaluate",
            json!({ "expression": js, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(
            r["exceptionDetails"].is_null(),
            "{js}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Opens `url` and waits until the page has loaded.
    pub fn open(&mut self, url: &str) {
        self.cmd("Page.navigate", json!({ "url": url }));
        self.settle();
    }

    /// Waits until the document is complete (after a click that navigates).
    pub fn settle(&mut self) {
        std::thread::sleep(Duration::from_millis(150));
        self.wait_for("document.readyState === 'complete'");
    }

    /// Waits (up to 10 s) until `js` is true.
    pub fn wait_for(&mut self, js: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.eval(&format!("!!({js})")) != json!(true) {
            assert!(
                Instant::now() < deadline,
                "still not true after 10 s: {js}\npage: {}",
                self.text("body")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&mut self) -> String {
        self.eval("location.href")
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The text of the first element `selector` matches ("" if none).
    pub fn text(&mut self, selector: &str) -> String {
        let js = format!(
            "(document.querySelector({}) || {{innerText: ''}}).innerText",
            json!(selector)
        );
        self.eval(&js).as_str().unwrap_or("").to_string()
    }

    /// Clicks the first element `selector` matches.
    pub fn click(&mut self, selector: &str) {
        self.wait_for(&format!("document.querySelector({})", json!(selector)));
        self.eval(&format!(
            "document.querySelector({}).click()",
            json!(selector)
        ));
    }

    /// Focuses `selector`, empties it, and types `text` as a person would.
    pub fn type_into(&mut self, selector: &str, text: &str) {
        self.wait_for(&format!("document.querySelector({})", json!(selector)));
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); e.focus(); e.select(); }})()",
            json!(selector)
        ));
        self.cmd("Input.insertText", json!({ "text": text }));
    }

    /// Saves a screenshot as `<shots>/<name>.png`.
    pub fn shot(&mut self, name: &str) {
        let r = self.cmd("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            r["data"].as_str().unwrap(),
        )
        .unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }
}
