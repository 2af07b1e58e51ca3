//! The files ops of the agent as typed calls on a [`Door`]: `stat`, `list`, `read`, `write`,
//! `remove`, `move`, `mkdir`, `tar`, `untar` and `watch` (docs/agent-protocol.md, "Ops"). Each
//! is one [`Door::agent_call`]; paths are relative to /workspace and resolved by the agent,
//! inside the sandbox (the edge validates them too, but never follows anything itself).

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{AgentBody, AgentCall, AgentError, Frame};
use crate::sandbox::shell::Door;

/// Most entries one `list` returns (the agent's own cap).
pub const LIST_LIMIT: u64 = 10_000;

/// One file-system entry as the agent describes it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// Relative to /workspace (`""` is the root).
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub size: u64,
    /// Permission bits.
    #[serde(default)]
    pub mode: u32,
    /// Milliseconds since the epoch.
    #[serde(default)]
    pub modified: i64,
    /// Where a symlink points (symlinks only).
    #[serde(default)]
    pub target: Option<String>,
}

/// A folder's entries, sorted by name.
#[derive(Clone, Debug, Deserialize)]
pub struct Listing {
    pub entries: Vec<Entry>,
    #[serde(default)]
    pub truncated: bool,
}

/// A `read` under way: the file's whole size, then its bytes through [`Stream::chunk`].
pub struct FileRead {
    pub size: u64,
    pub modified: i64,
    pub mode: u32,
    pub stream: Stream,
}

/// The `DATA` frames of a `read` or a `tar`, or the `EVENT` frames of a `watch`.
pub struct Stream(AgentCall);

impl Stream {
    /// The next `DATA` payload; `None` after `END`. Other frames are skipped.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, AgentError> {
        loop {
            match self.0.next().await? {
                None => return Ok(None),
                Some(Frame::Data(b)) => return Ok(Some(b)),
                Some(_) => continue,
            }
        }
    }

    /// The next `EVENT` object; `None` after `END`. Other frames are skipped.
    pub async fn event(&mut self) -> Result<Option<Value>, AgentError> {
        loop {
            match self.0.next().await? {
                None => return Ok(None),
                Some(Frame::Event(v)) => return Ok(Some(v)),
                Some(_) => continue,
            }
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    head: &Value,
    field: Option<&str>,
) -> Result<T, AgentError> {
    let v = match field {
        Some(f) => head.get(f).cloned().unwrap_or(Value::Null),
        None => head.clone(),
    };
    serde_json::from_value(v).map_err(|e| AgentError::Lost(format!("unexpected answer: {e}")))
}

impl Door {
    async fn files_head(&self, op: Value, body: Option<AgentBody>) -> Result<Value, AgentError> {
        let mut call = self.agent_call(op, body).await?;
        Ok(std::mem::take(&mut call.head))
    }

    /// `stat`: the entry at `path` (symlinks on the way resolved inside the sandbox).
    pub async fn file_stat(&self, path: &str) -> Result<Entry, AgentError> {
        let head = self
            .files_head(json!({"op": "stat", "path": path}), None)
            .await?;
        parse(&head, Some("entry"))
    }

    /// `list`: a folder's entries (at most [`LIST_LIMIT`]).
    pub async fn file_list(&self, path: &str) -> Result<Listing, AgentError> {
        let head = self
            .files_head(
                json!({"op": "list", "path": path, "limit": LIST_LIMIT}),
                None,
            )
            .await?;
        parse(&head, None)
    }

    /// `read`: `length` bytes (all when `None`) from `offset`.
    pub async fn file_read(
        &self,
        path: &str,
        offset: u64,
        length: Option<u64>,
    ) -> Result<FileRead, AgentError> {
        let mut op = json!({"op": "read", "path": path, "offset": offset});
        if let Some(l) = length {
            op["length"] = l.into();
        }
        let call = self.agent_call(op, None).await?;
        let n = |k: &str| call.head.get(k).and_then(Value::as_u64).unwrap_or(0);
        Ok(FileRead {
            size: n("size"),
            modified: call
                .head
                .get("modified")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            mode: n("mode") as u32,
            stream: Stream(call),
        })
    }

    /// `write`: the body becomes the file (atomically, parents created); more than `max_bytes`
    /// is refused (`too_large`) and nothing is written.
    pub async fn file_write(
        &self,
        path: &str,
        max_bytes: u64,
        body: AgentBody,
    ) -> Result<Entry, AgentError> {
        let head = self
            .files_head(
                json!({"op": "write", "path": path, "maxBytes": max_bytes}),
                Some(body),
            )
            .await?;
        parse(&head, Some("entry"))
    }

    /// `remove`: a file, a symlink (not its target) or a folder (non-empty only if `recursive`).
    pub async fn file_remove(&self, path: &str, recursive: bool) -> Result<(), AgentError> {
        self.files_head(
            json!({"op": "remove", "path": path, "recursive": recursive}),
            None,
        )
        .await
        .map(drop)
    }

    /// `move`: renames `from` to `to`, replacing an existing `to` only if `overwrite`.
    pub async fn file_move(
        &self,
        from: &str,
        to: &str,
        overwrite: bool,
    ) -> Result<Entry, AgentError> {
        let head = self
            .files_head(
                json!({"op": "move", "from": from, "to": to, "overwrite": overwrite}),
                None,
            )
            .await?;
        parse(&head, Some("entry"))
    }

    /// `mkdir`: a folder (with its parents if `parents`).
    pub async fn file_mkdir(&self, path: &str, parents: bool) -> Result<Entry, AgentError> {
        let head = self
            .files_head(
                json!({"op": "mkdir", "path": path, "parents": parents}),
                None,
            )
            .await?;
        parse(&head, Some("entry"))
    }

    /// `tar`: a `.tar.gz` of the folder's contents (or of the one file), streamed.
    pub async fn file_tar(&self, path: &str) -> Result<Stream, AgentError> {
        Ok(Stream(
            self.agent_call(json!({"op": "tar", "path": path}), None)
                .await?,
        ))
    }

    /// `untar`: extracts the `.tar.gz` body into the folder `path` (created); the number of
    /// files extracted.
    pub async fn file_untar(
        &self,
        path: &str,
        max_bytes: u64,
        body: AgentBody,
    ) -> Result<u64, AgentError> {
        let head = self
            .files_head(
                json!({"op": "untar", "path": path, "maxBytes": max_bytes}),
                Some(body),
            )
            .await?;
        Ok(head.get("files").and_then(Value::as_u64).unwrap_or(0))
    }

    /// `watch`: events under `path` until the stream is dropped.
    pub async fn file_watch(&self, path: &str, recursive: bool) -> Result<Stream, AgentError> {
        Ok(Stream(
            self.agent_call(
                json!({"op": "watch", "path": path, "recursive": recursive}),
                None,
            )
            .await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse() {
        let head = json!({"ok": true, "entry": {"name": "l", "path": "a/l", "type": "symlink",
            "size": 3, "mode": 511, "modified": 1700000000123_i64, "target": "/etc"}});
        let e: Entry = parse(&head, Some("entry")).unwrap();
        assert_eq!(e.kind, "symlink");
        assert_eq!(e.target.as_deref(), Some("/etc"));
        assert_eq!(e.modified, 1700000000123);
        let l: Listing =
            parse(&json!({"ok": true, "entries": [], "truncated": true}), None).unwrap();
        assert!(l.truncated);
        assert!(parse::<Entry>(&json!({"ok": true}), Some("entry")).is_err());
    }
}
