//! The wire protocol of a terminal WebSocket: control messages, sizes, how a session ended and
//! the close frame that tells the client.

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

const WRITE_BUFFER: usize = 64 * 1024;
const MAX_WRITE_BUFFER: usize = 512 * 1024;
/// The close reason when the engine went away under an open terminal.
pub(super) const ENGINE_DOWN_REASON: &str = "engine unavailable";

pub(super) const DEFAULT_SIZE: Size = Size { cols: 80, rows: 24 };
pub const MAX_DIM: u16 = 1000;

/// A terminal size in character cells, always within 1..=1000.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub cols: u16,
    pub rows: u16,
}

/// Clamps any integer to 1..=1000.
pub(super) fn clamp_dim(v: i128) -> u16 {
    v.clamp(1, MAX_DIM as i128) as u16
}

/// A client → server text frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    Input(String),
    Resize(Size),
    Ping,
}

/// Parses a control message. Pure (it is fuzzed): never panics, unknown fields are ignored,
/// sizes are clamped to 1..=1000; the error is a message for the client.
pub fn parse_control(text: &str) -> Result<Control, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("control message is not JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "control message must be a JSON object".to_owned())?;
    let kind = obj
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| "control message needs a string \"type\"".to_owned())?;
    match kind {
        "input" => match obj.get("data") {
            Some(serde_json::Value::String(s)) => Ok(Control::Input(s.clone())),
            _ => Err("input needs a string \"data\"".to_owned()),
        },
        "resize" => {
            let dim = |key: &str| -> Result<u16, String> {
                let n = obj
                    .get(key)
                    .ok_or_else(|| format!("resize needs \"{key}\""))?;
                // Integers of any size clamp; so do floats without a fraction (1e20).
                let n = n
                    .as_i64()
                    .map(i128::from)
                    .or_else(|| n.as_u64().map(i128::from))
                    .or_else(|| {
                        n.as_f64()
                            .filter(|f| f.is_finite() && f.fract() == 0.0)
                            .map(|f| f as i128)
                    })
                    .ok_or_else(|| format!("resize \"{key}\" must be an integer"))?;
                Ok(clamp_dim(n))
            };
            Ok(Control::Resize(Size {
                cols: dim("cols")?,
                rows: dim("rows")?,
            }))
        }
        "ping" => Ok(Control::Ping),
        other => Err(format!(
            "unknown control type {:?}; expected input, resize or ping",
            truncate(other, 64)
        )),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The longest prefix of at most `max` bytes that ends on a character boundary (a close
/// reason must fit a 125-byte control frame).
fn cut_bytes(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The text frame answering an invalid control message.
pub(super) fn error_frame(message: &str) -> String {
    serde_json::json!({"type": "error", "code": "invalid_control", "message": message}).to_string()
}

pub(super) const PONG_FRAME: &str = r#"{"type":"pong"}"#;

/// How a bridged session ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The exec's output ended: the shell exited.
    ShellExited,
    /// The client sent a close frame.
    ClientClosed,
    /// The client went away without closing (transport error, silence past the limit).
    Gone,
    /// The client broke the protocol; the close code to send (1009, 1002, 1007).
    Refused(u16, String),
    /// The engine failed (reading output); close with 1011.
    EngineFailed(String),
    /// The engine went away (down or restarting, see sandbox/health.rs); close with 1011.
    EngineDown,
}

/// The close frame for an outcome. `exit` is the shell's status when it ended.
pub(super) fn close_frame(outcome: &Outcome, exit: Option<i64>) -> Option<CloseFrame<'static>> {
    let (code, reason) = match outcome {
        Outcome::ShellExited => (
            1000,
            match exit {
                Some(c) => format!("exit {c}"),
                None => "exit".to_owned(),
            },
        ),
        Outcome::Refused(code, reason) => (*code, cut_bytes(reason, 120).to_owned()),
        Outcome::EngineFailed(_) => (1011, "terminal failed".to_owned()),
        Outcome::EngineDown => (1011, ENGINE_DOWN_REASON.to_owned()),
        Outcome::ClientClosed | Outcome::Gone => return None,
    };
    Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    })
}

pub(super) fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig {
        max_frame_size: Some(max_frame),
        max_message_size: Some(max_frame),
        write_buffer_size: WRITE_BUFFER,
        max_write_buffer_size: MAX_WRITE_BUFFER,
        ..WebSocketConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages() {
        assert_eq!(
            parse_control(r#"{"type":"input","data":"ls\r"}"#),
            Ok(Control::Input("ls\r".into()))
        );
        assert_eq!(
            parse_control(r#"{"type":"resize","cols":120,"rows":40,"extra":1}"#),
            Ok(Control::Resize(Size {
                cols: 120,
                rows: 40
            }))
        );
        assert_eq!(
            parse_control(r#"{"type":"resize","cols":0,"rows":1e300}"#),
            Ok(Control::Resize(Size {
                cols: 1,
                rows: 1000
            }))
        );
        assert_eq!(
            parse_control(r#"{"type":"resize","cols":-5,"rows":18446744073709551615}"#),
            Ok(Control::Resize(Size {
                cols: 1,
                rows: 1000
            }))
        );
        assert_eq!(
            parse_control(r#"{"type":"resize","cols":0,"rows":1001}"#),
            Ok(Control::Resize(Size {
                cols: 1,
                rows: 1000
            }))
        );
        assert_eq!(parse_control(r#"{"type":"ping"}"#), Ok(Control::Ping));
        for bad in [
            "",
            "not json",
            "[]",
            "42",
            r#"{"data":"x"}"#,
            r#"{"type":5}"#,
            r#"{"type":"input"}"#,
            r#"{"type":"input","data":5}"#,
            r#"{"type":"resize","cols":"80","rows":24}"#,
            r#"{"type":"resize","cols":80.5,"rows":24}"#,
            r#"{"type":"resize","rows":24}"#,
            r#"{"type":"exec","cmd":"rm -rf /"}"#,
        ] {
            assert!(parse_control(bad).is_err(), "{bad:?} should be refused");
        }
        // Long unknown types are cut in the message.
        let long = format!(r#"{{"type":"{}"}}"#, "é".repeat(500));
        assert!(parse_control(&long).unwrap_err().len() < 300);
        let e: serde_json::Value = serde_json::from_str(&error_frame("bad \"x\"")).unwrap();
        assert_eq!(e["type"], "error");
        assert_eq!(e["code"], "invalid_control");
        assert_eq!(e["message"], "bad \"x\"");
    }

    #[test]
    fn close_frames() {
        let f = close_frame(&Outcome::ShellExited, Some(3)).unwrap();
        assert_eq!((u16::from(f.code), f.reason.as_ref()), (1000, "exit 3"));
        let f = close_frame(&Outcome::ShellExited, None).unwrap();
        assert_eq!((u16::from(f.code), f.reason.as_ref()), (1000, "exit"));
        let f = close_frame(&Outcome::Refused(1009, "x".repeat(500)), None).unwrap();
        assert_eq!(u16::from(f.code), 1009);
        assert!(
            f.reason.len() <= 123,
            "close reasons must fit a control frame"
        );
        let f = close_frame(&Outcome::Refused(1002, "é".repeat(100)), None).unwrap();
        assert_eq!(f.reason.len(), 120);
        assert_eq!(
            u16::from(
                close_frame(&Outcome::EngineFailed("e".into()), None)
                    .unwrap()
                    .code
            ),
            1011
        );
        let f = close_frame(&Outcome::EngineDown, None).unwrap();
        assert_eq!(u16::from(f.code), 1011);
        assert_eq!(f.reason, ENGINE_DOWN_REASON);
        assert!(close_frame(&Outcome::ClientClosed, None).is_none());
        assert!(close_frame(&Outcome::Gone, None).is_none());
    }
}
