//! MQTT 3.1.1 and 5 on one port: the codec of a connection is chosen from
//! the protocol level of its CONNECT, then rumqttd's `protocol` codecs frame
//! and encode every packet.

use bytes::BytesMut;
use rumqttd::protocol::{self, v4::V4, v5::V5, Packet, Protocol};

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// Not enough bytes yet.
    Incomplete,
    Codec(Codec),
    /// A CONNECT of a protocol level Umbra does not speak (MQTT 3.1 is 3).
    UnsupportedLevel(u8),
    /// Not an MQTT CONNECT at all.
    NotConnect,
}

/// Reads the protocol level of the CONNECT at the start of `bytes`:
/// fixed header (0x10, remaining length in 1–4 bytes), then the protocol
/// name ("MQTT", length-prefixed) and the level byte.
pub fn sniff(bytes: &[u8]) -> Sniffed {
    let Some(&first) = bytes.first() else {
        return Sniffed::Incomplete;
    };
    if first != 0x10 {
        return Sniffed::NotConnect;
    }
    let mut at = 1;
    loop {
        match bytes.get(at) {
            None => return Sniffed::Incomplete,
            Some(b) if b & 0x80 == 0 => break,
            Some(_) if at == 4 => return Sniffed::NotConnect,
            Some(_) => at += 1,
        }
    }
    let header = at + 1;
    let Some(name) = bytes.get(header..header + 6) else {
        return Sniffed::Incomplete;
    };
    if name != [0, 4, b'M', b'Q', b'T', b'T'] {
        // MQTT 3.1 ("MQIsdp") or not MQTT.
        return match name.get(..2) {
            Some([0, 6]) => Sniffed::UnsupportedLevel(3),
            _ => Sniffed::NotConnect,
        };
    }
    match bytes.get(header + 6) {
        None => Sniffed::Incomplete,
        Some(4) => Sniffed::Codec(Codec::V4),
        Some(5) => Sniffed::Codec(Codec::V5),
        Some(&level) => Sniffed::UnsupportedLevel(level),
    }
}

impl Codec {
    /// Frames the next packet of `buffer` (at most `max_size` bytes);
    /// `Err(InsufficientBytes)` when it is not complete yet.
    pub fn read(self, buffer: &mut BytesMut, max_size: usize) -> Result<Packet, protocol::Error> {
        match self {
            Codec::V4 => V4.read_mut(buffer, max_size),
            Codec::V5 => V5.read_mut(buffer, max_size),
        }
    }

    /// Encodes `packet` at the end of `buffer`. MQTT 3.1.1 has no
    /// properties: a packet's MQTT 5 properties (a v5 publisher's, passed on
    /// by the router) are left out for it.
    pub fn write(self, packet: Packet, buffer: &mut BytesMut) -> Result<usize, protocol::Error> {
        match self {
            Codec::V4 => V4.write(without_properties(packet), buffer),
            Codec::V5 => V5.write(packet, buffer),
        }
    }
}

/// `packet` without its MQTT 5 properties (CONNACK's are ignored by the
/// MQTT 3.1.1 encoder already).
fn without_properties(packet: Packet) -> Packet {
    match packet {
        Packet::Connect(connect, _, will, _, login) => {
            Packet::Connect(connect, None, will, None, login)
        }
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::Subscribe(p, _) => Packet::Subscribe(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::Unsubscribe(p, _) => Packet::Unsubscribe(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(level: u8) -> Vec<u8> {
        let mut v = vec![
            0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', level, 2, 0, 60, 0, 0,
        ];
        v[1] = (v.len() - 2) as u8;
        v
    }

    #[test]
    fn sniffs_the_protocol_level() {
        assert_eq!(sniff(&connect(4)), Sniffed::Codec(Codec::V4));
        assert_eq!(sniff(&connect(5)), Sniffed::Codec(Codec::V5));
        assert_eq!(sniff(&connect(7)), Sniffed::UnsupportedLevel(7));
        assert_eq!(sniff(&connect(4)[..5]), Sniffed::Incomplete);
        assert_eq!(sniff(&[]), Sniffed::Incomplete);
        assert_eq!(sniff(b"GET / HTTP/1.1"), Sniffed::NotConnect);
        let mut mqisdp = vec![0x10, 14, 0, 6];
        mqisdp.extend_from_slice(b"MQIsdp\x03");
        assert_eq!(sniff(&mqisdp), Sniffed::UnsupportedLevel(3));
    }

    #[test]
    fn both_codecs_read_their_connect() {
        for (level, codec) in [(4, Codec::V4), (5, Codec::V5)] {
            let mut bytes = connect(level);
            if level == 5 {
                // Properties length 0 after keep-alive.
                bytes.insert(12, 0);
                bytes[1] += 1;
            }
            let mut buffer = BytesMut::from(&bytes[..]);
            let packet = codec.read(&mut buffer, 1024).expect("a CONNECT");
            assert!(matches!(packet, Packet::Connect(..)), "{packet:?}");
        }
    }
}
