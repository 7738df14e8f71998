//! Files going between a thread and a session: what kind a file is, how it travels in a prompt (a
//! `data:` URL), and which paths `!file` may ask the OpenCode server for. Pure: `!file` never looks at
//! this host's disk, which may not be the server's.

use std::path::{Component, Path};

/// A file sent along with a prompt, as an OpenCode file part (re-exported by `opencode`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FileAttachment {
    pub filename: String,
    pub mime: String,
    /// A `data:` URL carrying the bytes.
    pub url: String,
}

/// Why a path given to `!file` is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRefusal {
    pub path: String,
    pub reason: String,
}

impl std::fmt::Display for PathRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot read \"{}\": {}; give a path relative to the session's directory, such as src/main.rs",
            self.path.escape_debug(),
            self.reason
        )
    }
}

/// The MIME type of a file: by its extension, else by its first bytes, else `text/plain` for UTF-8
/// text and `application/octet-stream` for anything else.
pub fn mime_for(filename: &str, bytes: &[u8]) -> String {
    let extension = Path::new(filename)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let by_extension = match extension.as_str() {
        "png" => Some("image/png"),
        "jpg" | "jpeg" => Some("image/jpeg"),
        "gif" => Some("image/gif"),
        "webp" => Some("image/webp"),
        "pdf" => Some("application/pdf"),
        "svg" => Some("image/svg+xml"),
        "json" => Some("application/json"),
        "md" | "markdown" => Some("text/markdown"),
        "html" | "htm" => Some("text/html"),
        "csv" => Some("text/csv"),
        _ => None,
    };
    if let Some(mime) = by_extension {
        return mime.to_string();
    }
    let by_magic = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else if bytes.starts_with(b"%PDF-") {
        Some("application/pdf")
    } else {
        None
    };
    match by_magic {
        Some(mime) => mime.to_string(),
        None if std::str::from_utf8(bytes).is_ok() => "text/plain".to_string(),
        None => "application/octet-stream".to_string(),
    }
}

/// Images and PDFs go to the model as they are (it can look at them); everything else is sent as text.
pub fn is_inline_kind(mime: &str) -> bool {
    (mime.starts_with("image/") && mime != "image/svg+xml") || mime == "application/pdf"
}

/// Whether a file can be sent to the model at all: an image, a PDF or UTF-8 text.
pub fn is_sendable(mime: &str, bytes: &[u8]) -> bool {
    is_inline_kind(mime) || std::str::from_utf8(bytes).is_ok()
}

/// `data:<mime>;base64,<bytes>`.
pub fn data_url(mime: &str, bytes: &[u8]) -> String {
    format!("data:{mime};base64,{}", base64_encode(bytes))
}

/// A file as a prompt attachment. Text of any kind is sent as `text/plain`, the one text type OpenCode
/// unpacks into the prompt for the model (as if its read tool had read the file); other text types
/// would reach the provider as opaque files.
pub fn attachment(filename: &str, bytes: &[u8]) -> FileAttachment {
    let detected = mime_for(filename, bytes);
    let mime = if is_inline_kind(&detected) {
        detected
    } else {
        "text/plain".to_string()
    };
    FileAttachment {
        filename: filename.to_string(),
        url: data_url(&mime, bytes),
        mime,
    }
}

/// Standard base64 with padding (RFC 4648 section 4).
pub fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes standard or URL-safe base64, padded or not, ignoring whitespace. `None` when it is not base64.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD_PAD_INDIFFERENT, URL_SAFE_PAD_INDIFFERENT};
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engine = if compact.contains(['-', '_']) {
        URL_SAFE_PAD_INDIFFERENT
    } else {
        STANDARD_PAD_INDIFFERENT
    };
    engine.decode(compact).ok()
}

/// Checks a path given to `!file`: relative, without `..`, NUL or control characters. Returns it with
/// `.` components and repeated slashes removed.
pub fn checked_relative_path(requested: &str) -> Result<String, PathRefusal> {
    let refuse = |reason: &str| PathRefusal {
        path: requested.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = requested.trim();
    if trimmed.is_empty() {
        return Err(refuse("the path is empty"));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(refuse("the path contains a control character"));
    }
    if trimmed.starts_with('/') || trimmed.starts_with('~') || trimmed.contains('\\') {
        return Err(refuse(
            "only paths inside the session's directory can be read, and this one is absolute",
        ));
    }
    let mut parts = Vec::new();
    for component in Path::new(trimmed).components() {
        match component {
            Component::Normal(part) => match part.to_str() {
                Some(part) => parts.push(part),
                None => return Err(refuse("the path is not valid UTF-8")),
            },
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(refuse("\"..\" could leave the session's directory"));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(
                    "only paths inside the session's directory can be read, and this one is absolute",
                ));
            }
        }
    }
    if parts.is_empty() {
        return Err(refuse("the path names the directory itself, not a file"));
    }
    // Checked again once `.` is gone: "./~/x" must not become the home-relative "~/x".
    if parts[0].starts_with('~') {
        return Err(refuse(
            "only paths inside the session's directory can be read, and this one is absolute",
        ));
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors_both_ways() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).as_deref(), Some(plain.as_bytes()));
        }
    }

    #[test]
    fn base64_decode_accepts_unpadded_and_url_safe_and_refuses_garbage() {
        assert_eq!(base64_decode("Zm8").as_deref(), Some(&b"fo"[..]));
        assert_eq!(base64_decode("-_8=").as_deref(), Some(&[0xfb, 0xff][..]));
        assert_eq!(base64_decode("+/8=").as_deref(), Some(&[0xfb, 0xff][..]));
        assert_eq!(base64_decode("Zm9v\nYmFy").as_deref(), Some(&b"foobar"[..]));
        assert_eq!(base64_decode("Zm9v!"), None);
        assert_eq!(base64_decode("Z"), None);
        assert_eq!(base64_decode("Zg==Zg"), None);
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)), Some(all));
    }

    #[test]
    fn mime_comes_from_the_extension_then_the_bytes() {
        let png = b"\x89PNG\r\n\x1a\n rest";
        assert_eq!(mime_for("shot.PNG", b""), "image/png");
        assert_eq!(mime_for("photo.jpeg", b""), "image/jpeg");
        assert_eq!(mime_for("doc.pdf", b""), "application/pdf");
        assert_eq!(mime_for("noext", png), "image/png");
        assert_eq!(
            mime_for("upload.bin", &[0xFF, 0xD8, 0xFF, 0xE0]),
            "image/jpeg"
        );
        assert_eq!(mime_for("a", b"GIF89a...."), "image/gif");
        assert_eq!(mime_for("a", b"RIFF\0\0\0\0WEBPVP8 "), "image/webp");
        assert_eq!(mime_for("a", b"%PDF-1.7"), "application/pdf");
        assert_eq!(
            mime_for("main.rs", "fn main() {} // ü".as_bytes()),
            "text/plain"
        );
        assert_eq!(
            mime_for("blob", &[0, 159, 146, 150]),
            "application/octet-stream"
        );
    }

    #[test]
    fn images_and_pdfs_go_inline_and_text_goes_as_text_plain() {
        assert!(is_inline_kind("image/png"));
        assert!(is_inline_kind("application/pdf"));
        assert!(!is_inline_kind("image/svg+xml"));
        assert!(!is_inline_kind("text/plain"));

        let image = attachment("shot.png", b"\x89PNG\r\n\x1a\n");
        assert_eq!(image.mime, "image/png");
        assert_eq!(image.url, "data:image/png;base64,iVBORw0KGgo=");
        let notes = attachment("notes.md", b"# Hi");
        assert_eq!(notes.mime, "text/plain");
        assert_eq!(notes.filename, "notes.md");
        assert_eq!(notes.url, "data:text/plain;base64,IyBIaQ==");
        assert!(is_sendable("text/plain", b"text"));
        assert!(!is_sendable(
            "application/octet-stream",
            &[0xff, 0xfe, 0x00]
        ));
    }

    #[test]
    fn relative_paths_are_normalised() {
        assert_eq!(
            checked_relative_path("src/main.rs").as_deref(),
            Ok("src/main.rs")
        );
        assert_eq!(
            checked_relative_path("./src//main.rs").as_deref(),
            Ok("src/main.rs")
        );
        assert_eq!(
            checked_relative_path(" README.md ").as_deref(),
            Ok("README.md")
        );
    }

    #[test]
    fn paths_leaving_the_directory_are_refused_with_the_reason() {
        let cases = [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("~/secrets", "absolute"),
            ("../other/file", "\"..\""),
            ("src/../../x", "\"..\""),
            ("a\0b", "control character"),
            ("a\\..\\b", "absolute"),
            (".", "directory itself"),
        ];
        for (path, reason) in cases {
            let refusal = checked_relative_path(path).expect_err(path);
            let message = refusal.to_string();
            assert!(message.contains(reason), "{path:?}: {message}");
            assert!(
                message.contains(&path.escape_debug().to_string()),
                "{message}"
            );
        }
    }
}
