//! A small `multipart/form-data` reader for `POST /api/v4/files`.

pub(super) struct Part {
    pub(super) name: String,
    pub(super) filename: Option<String>,
    pub(super) data: Vec<u8>,
}

/// The `boundary` parameter of a `multipart/form-data` content type.
pub(super) fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let media = params.next()?.trim();
    if !media.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| unquote(value.trim()))
            .filter(|b| !b.is_empty())
    })
}

/// Splits a body into its parts; `Err` for anything malformed.
pub(super) fn parse(body: &[u8], boundary: &str) -> Result<Vec<Part>, ()> {
    let delimiter = format!("--{boundary}").into_bytes();
    let mut separator = b"\r\n".to_vec();
    separator.extend_from_slice(&delimiter);
    let mut position = if body.starts_with(&delimiter) {
        delimiter.len()
    } else {
        find(body, &separator, 0).ok_or(())? + separator.len()
    };
    let mut parts = Vec::new();
    loop {
        let rest = &body[position..];
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        // Transport padding, then the line break after the delimiter.
        let line_end = find(body, b"\r\n", position).ok_or(())?;
        if !body[position..line_end]
            .iter()
            .all(|b| *b == b' ' || *b == b'\t')
        {
            return Err(());
        }
        let headers_start = line_end + 2;
        let headers_end = find(body, b"\r\n\r\n", headers_start)
            .map(|end| end + 4)
            .or_else(|| {
                body[headers_start..]
                    .starts_with(b"\r\n")
                    .then_some(headers_start + 2)
            })
            .ok_or(())?;
        let headers = String::from_utf8_lossy(&body[headers_start..headers_end]);
        let data_end = find(body, &separator, headers_end).ok_or(())?;
        let mut name = None;
        let mut filename = None;
        for line in headers.split("\r\n") {
            let Some((header, value)) = line.split_once(':') else {
                continue;
            };
            if !header.trim().eq_ignore_ascii_case("content-disposition") {
                continue;
            }
            for param in value.split(';').skip(1) {
                let Some((key, raw)) = param.split_once('=') else {
                    continue;
                };
                match key.trim().to_ascii_lowercase().as_str() {
                    "name" => name = Some(unquote(raw.trim())),
                    "filename" => filename = Some(unquote(raw.trim())),
                    _ => {}
                }
            }
        }
        parts.push(Part {
            name: name.unwrap_or_default(),
            filename,
            data: body[headers_end..data_end].to_vec(),
        });
        position = data_end + separator.len();
    }
}

fn unquote(value: &str) -> String {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => value.to_owned(),
    }
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > haystack.len() {
        return None;
    }
    haystack[from..]
        .windows(needle.len())
        .position(|window| window == needle)
        .map(|i| i + from)
}
