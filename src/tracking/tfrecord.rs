//! TensorBoard's event-file format, written by hand: TFRecord framing
//! (length, masked CRC-32C of the length, data, masked CRC-32C of the data)
//! around `tensorflow.Event` protobuf messages, of which only the few
//! fields TensorBoard reads for scalars and hyperparameters are encoded.

/// A protobuf message under construction: fields appended in order.
#[derive(Default)]
pub struct Message(Vec<u8>);

/// Wire types.
const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const BYTES: u64 = 2;
const FIXED32: u64 = 5;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

impl Message {
    fn key(&mut self, field: u64, wire: u64) {
        varint(&mut self.0, (field << 3) | wire);
    }

    pub fn int(mut self, field: u64, v: i64) -> Self {
        self.key(field, VARINT);
        // int64: two's complement as a 64-bit varint.
        varint(&mut self.0, v as u64);
        self
    }

    pub fn double(mut self, field: u64, v: f64) -> Self {
        self.key(field, FIXED64);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn float(mut self, field: u64, v: f32) -> Self {
        self.key(field, FIXED32);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(mut self, field: u64, v: &[u8]) -> Self {
        self.key(field, BYTES);
        varint(&mut self.0, v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }

    pub fn string(self, field: u64, v: &str) -> Self {
        self.bytes(field, v.as_bytes())
    }

    pub fn message(self, field: u64, v: Message) -> Self {
        self.bytes(field, &v.0)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// TFRecord's masked CRC: rotated and offset so that a CRC of data that
/// holds CRCs stays well distributed.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One record as it goes into the file.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// `tensorflow.Event` fields.
mod event {
    pub const WALL_TIME: u64 = 1;
    pub const STEP: u64 = 2;
    pub const FILE_VERSION: u64 = 3;
    pub const SUMMARY: u64 = 5;
}

/// The event every file starts with.
pub fn file_version(wall_time: f64) -> Vec<u8> {
    Message::default()
        .double(event::WALL_TIME, wall_time)
        .string(event::FILE_VERSION, "brain.Event:2")
        .into_bytes()
}

/// An event of scalar summaries (`Summary.Value.simple_value`) at `step`.
pub fn scalars(wall_time: f64, step: i64, values: &[(String, f32)]) -> Vec<u8> {
    let mut summary = Message::default();
    for (tag, v) in values {
        summary = summary.message(1, Message::default().string(1, tag).float(2, *v));
    }
    Message::default()
        .double(event::WALL_TIME, wall_time)
        .int(event::STEP, step)
        .message(event::SUMMARY, summary)
        .into_bytes()
}

/// A hyperparameter value (`google.protobuf.Value`).
#[derive(Clone, Debug, PartialEq)]
pub enum HParam {
    Number(f64),
    Text(String),
    Bool(bool),
}

/// The hparams plugin's session start (`HParamsPluginData.session_start_info`,
/// under the tag `_hparams_/session_start_info`): the run's hyperparameters,
/// which TensorBoard's HParams dashboard tables and plots against the
/// run's scalars.
pub fn session_start(wall_time: f64, group: &str, hparams: &[(String, HParam)]) -> Vec<u8> {
    let mut info = Message::default();
    for (name, value) in hparams {
        let v = match value {
            HParam::Number(x) => Message::default().double(2, *x),
            HParam::Text(s) => Message::default().string(3, s),
            HParam::Bool(b) => Message::default().int(4, i64::from(*b)),
        };
        info = info.message(1, Message::default().string(1, name).message(2, v));
    }
    let info = info.string(4, group).double(5, wall_time);
    let plugin_data = Message::default().message(3, info).into_bytes();
    let metadata = Message::default().message(
        1,
        Message::default()
            .string(1, "hparams")
            .bytes(2, &plugin_data),
    );
    let value = Message::default()
        .string(1, "_hparams_/session_start_info")
        .message(9, metadata);
    Message::default()
        .double(event::WALL_TIME, wall_time)
        .message(event::SUMMARY, Message::default().message(1, value))
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_its_mask_match_the_published_values() {
        // RFC 3720's check value for "123456789", and TFRecord's mask of it
        // computed by hand: rotate right 15, add 0xa282ead8.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn a_record_frames_its_data() {
        let r = record(b"abc");
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[15..], &masked_crc(b"abc").to_le_bytes());
    }

    #[test]
    fn protobuf_fields_encode_as_the_wire_format_says() {
        // Field 2 varint 150: 0x10 0x96 0x01 (the protobuf docs' example is field 1: 08 96 01).
        assert_eq!(
            Message::default().int(2, 150).into_bytes(),
            [0x10, 0x96, 0x01]
        );
        // A negative int64 takes ten bytes.
        assert_eq!(Message::default().int(2, -1).into_bytes().len(), 11);
        assert_eq!(
            Message::default().string(1, "hi").into_bytes(),
            [0x0a, 2, b'h', b'i']
        );
        let f = Message::default().float(2, 1.0).into_bytes();
        assert_eq!(f, [0x15, 0, 0, 0x80, 0x3f]);
        let d = Message::default().double(1, 1.0).into_bytes();
        assert_eq!(d, [0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f]);
    }
}
