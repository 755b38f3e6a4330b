//! QR codes for pairing: the host answers with SVG, the CLI draws them in the terminal.

use qrcode::render::{svg, unicode};
use qrcode::{EcLevel, QrCode};

#[derive(Debug, thiserror::Error)]
#[error("cannot encode this pairing payload as a QR code: {0}")]
pub struct QrError(String);

fn encode(payload: &str) -> Result<QrCode, QrError> {
    // WhatsApp's pairing payloads are ~200 bytes of text; level L keeps the code small enough to
    // scan from a terminal.
    QrCode::with_error_correction_level(payload.as_bytes(), EcLevel::L)
        .map_err(|e| QrError(e.to_string()))
}

/// An SVG image of the QR code (black on white, with the quiet zone).
pub fn svg(payload: &str) -> Result<String, QrError> {
    Ok(encode(payload)?
        .render::<svg::Color<'_>>()
        .min_dimensions(256, 256)
        .quiet_zone(true)
        .build())
}

/// The QR code drawn with Unicode half blocks, two modules per character row, for a terminal.
pub fn terminal(payload: &str) -> Result<String, QrError> {
    Ok(encode(payload)?
        .render::<unicode::Dense1x2>()
        .dark_color(unicode::Dense1x2::Light)
        .light_color(unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_pairing_payload() {
        let payload = format!(
            "2@{},{},{},{}",
            "A".repeat(88),
            "B".repeat(44),
            "C".repeat(44),
            "D".repeat(24)
        );
        let s = svg(&payload).unwrap_or_default();
        assert!(
            s.starts_with("<?xml") && s.contains("<svg") && s.contains("<path"),
            "{s:.80}"
        );
        let t = terminal(&payload).unwrap_or_default();
        let rows: Vec<&str> = t.lines().collect();
        assert!(rows.len() > 20, "{} rows", rows.len());
        assert!(rows
            .iter()
            .all(|r| r.chars().count() == rows[0].chars().count()));
    }
}
