//! Files attached to a prompt: checked against the size cap before anything is downloaded, then
//! downloaded and turned into OpenCode file parts. A prompt is sent whole or not at all.

use crate::files;
use crate::opencode::FileAttachment;

use super::Worker;

impl Worker {
    /// The prompt's files as file parts, or the reply that explains which file was refused and why.
    pub(super) fn fetch_attachments(
        &self,
        file_ids: &[String],
    ) -> Result<Vec<FileAttachment>, String> {
        if file_ids.is_empty() {
            return Ok(Vec::new());
        }
        let cap = self.max_file_size;
        let mut infos = Vec::with_capacity(file_ids.len());
        for id in file_ids {
            match self.mattermost.file_info(id) {
                Ok(info) => infos.push(info),
                Err(e) => {
                    return Err(format!(
                        "⚠️ Your message was not sent: attachment `{id}` could not be read from Mattermost ({e}). Send it again."
                    ));
                }
            }
        }
        let total: u64 = infos.iter().map(|i| i.size).sum();
        if total > cap {
            let largest = infos.iter().max_by_key(|i| i.size);
            let named = largest
                .map(|i| format!(" (`{}` alone is {})", i.name, size_text(i.size)))
                .unwrap_or_default();
            return Err(format!(
                "🚫 Your message was not sent: its files total {}{named}, over the {} limit per message \
                 (OPENCODE_MM_MAX_FILE_SIZE). Send smaller files, or fewer at once.",
                size_text(total),
                size_text(cap)
            ));
        }
        let mut attachments = Vec::with_capacity(infos.len());
        let mut left = cap;
        for info in infos {
            let bytes = match self.mattermost.download_file(&info.id, left) {
                Ok(bytes) => bytes,
                Err(e) => {
                    return Err(format!(
                        "⚠️ Your message was not sent: `{}` could not be downloaded ({e}). Send it again.",
                        info.name
                    ));
                }
            };
            left = left.saturating_sub(bytes.len() as u64);
            crate::debug!(
                "[{}] attachment {} ({} bytes)",
                self.short(),
                info.name,
                bytes.len()
            );
            attachments.push(files::attachment(&info.name, &bytes));
        }
        Ok(attachments)
    }
}

fn size_text(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else if bytes >= 1024 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::size_text;

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(size_text(12), "12 bytes");
        assert_eq!(size_text(2048), "2.0 KiB");
        assert_eq!(size_text(20 * 1024 * 1024), "20.0 MiB");
    }
}
