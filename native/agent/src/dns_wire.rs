//! The DNS wire format, as much of it as the transparent-egress responder needs: read the one
//! question of a query (following compression pointers, keeping the client's letter case so the
//! answer echoes it for 0x20 randomisation), and build the answer: one A or PTR record, no data,
//! or an error code. Nothing here does I/O; anything malformed is an error the caller ignores
//! (a UDP client retries, and a well-formed query is never refused for its shape).

use std::fmt;
use std::net::Ipv4Addr;

pub const TYPE_A: u16 = 1;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const HEADER: usize = 12;
/// A name is at most 255 bytes on the wire (RFC 1035 3.1); labels at most 63.
const MAX_NAME: usize = 255;
const MAX_LABEL: usize = 63;

#[derive(Debug, PartialEq, Eq)]
pub enum DnsError {
    /// The message ends before the header or question does.
    Short,
    /// Not a standard query with exactly one question (a response, another opcode, qdcount ≠ 1).
    NotQuery,
    /// A label or the name is too long, a label holds a byte no host name has, or a pointer
    /// loops or points forward.
    BadName,
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DnsError::Short => "the DNS message is truncated",
            DnsError::NotQuery => "the DNS message is not a query with one question",
            DnsError::BadName => "the DNS question's name is malformed",
        })
    }
}

/// One parsed question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// The client's recursion-desired bit, echoed in the answer.
    pub rd: bool,
    /// The name lowercased, labels joined by dots, no trailing dot ("" for the root).
    pub name: String,
    /// The name's labels as the client wrote them (letter case kept), uncompressed.
    labels: Vec<Vec<u8>>,
    pub qtype: u16,
    pub qclass: u16,
}

/// What to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// One A record.
    A(Ipv4Addr, u32),
    /// One PTR record naming `name` (dotted).
    Ptr(String, u32),
    /// NOERROR with no records (the name exists, not with this type).
    NoData,
    NxDomain,
    Refused,
    ServFail,
}

fn u16_at(msg: &[u8], at: usize) -> Result<u16, DnsError> {
    msg.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]])).ok_or(DnsError::Short)
}

/// Reads the name at `at`; returns its labels and the offset just after it in the message
/// (after the first pointer, if any). Pointers must point backwards, which also ends loops.
fn read_name(msg: &[u8], mut at: usize) -> Result<(Vec<Vec<u8>>, usize), DnsError> {
    let mut labels = Vec::new();
    let mut wire_len = 1;
    let mut end = None;
    loop {
        let len = *msg.get(at).ok_or(DnsError::Short)? as usize;
        match len & 0xc0 {
            0x00 => {
                if len == 0 {
                    return Ok((labels, end.unwrap_or(at + 1)));
                }
                if len > MAX_LABEL {
                    return Err(DnsError::BadName);
                }
                let label = msg.get(at + 1..at + 1 + len).ok_or(DnsError::Short)?;
                if label.iter().any(|&b| !b.is_ascii_graphic() || b == b'.') {
                    return Err(DnsError::BadName);
                }
                wire_len += 1 + len;
                if wire_len > MAX_NAME {
                    return Err(DnsError::BadName);
                }
                labels.push(label.to_vec());
                at += 1 + len;
            }
            0xc0 => {
                let target = (u16_at(msg, at)? & 0x3fff) as usize;
                if target >= at {
                    return Err(DnsError::BadName);
                }
                end.get_or_insert(at + 2);
                at = target;
            }
            _ => return Err(DnsError::BadName),
        }
    }
}

/// Parses a query: a standard query (QR 0, opcode 0) with exactly one question. Answer, authority
/// and additional sections (an EDNS OPT record, say) are ignored.
pub fn parse_query(msg: &[u8]) -> Result<Query, DnsError> {
    if msg.len() < HEADER {
        return Err(DnsError::Short);
    }
    let id = u16_at(msg, 0)?;
    let flags = u16_at(msg, 2)?;
    let qr = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    if qr || opcode != 0 || u16_at(msg, 4)? != 1 {
        return Err(DnsError::NotQuery);
    }
    let (labels, after) = read_name(msg, HEADER)?;
    let qtype = u16_at(msg, after)?;
    let qclass = u16_at(msg, after + 2)?;
    let name = labels.iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect::<Vec<_>>().join(".");
    Ok(Query { id, rd: flags & 0x0100 != 0, name, labels, qtype, qclass })
}

fn push_labels<'a>(out: &mut Vec<u8>, labels: impl Iterator<Item = &'a [u8]>) {
    for l in labels {
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
}

/// Builds the answer to `q`. The question is echoed as the client wrote it; records name it with a
/// pointer to offset 12. AA is clear and RA set: the agent answers as a recursive resolver would.
pub fn build_response(q: &Query, answer: &Answer) -> Vec<u8> {
    let rcode: u16 = match answer {
        Answer::A(..) | Answer::Ptr(..) | Answer::NoData => 0,
        Answer::ServFail => 2,
        Answer::NxDomain => 3,
        Answer::Refused => 5,
    };
    let ancount: u16 = matches!(answer, Answer::A(..) | Answer::Ptr(..)) as u16;
    let flags = 0x8000 | if q.rd { 0x0100 } else { 0 } | 0x0080 | rcode;
    let mut out = Vec::with_capacity(64);
    for v in [q.id, flags, 1, ancount, 0, 0] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    push_labels(&mut out, q.labels.iter().map(|l| l.as_slice()));
    out.extend_from_slice(&q.qtype.to_be_bytes());
    out.extend_from_slice(&q.qclass.to_be_bytes());
    let record = |out: &mut Vec<u8>, rtype: u16, ttl: u32, data: &[u8]| {
        out.extend_from_slice(&0xc00cu16.to_be_bytes());
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    };
    match answer {
        Answer::A(ip, ttl) => record(&mut out, TYPE_A, *ttl, &ip.octets()),
        Answer::Ptr(name, ttl) => {
            let mut data = Vec::new();
            push_labels(&mut data, name.split('.').filter(|l| !l.is_empty()).map(str::as_bytes));
            record(&mut out, TYPE_PTR, *ttl, &data);
        }
        _ => {}
    }
    out
}

/// The IPv4 address a reverse name (`d.c.b.a.in-addr.arpa`) asks about.
pub fn ptr_address(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let parts: Vec<u8> = rest.split('.').map(|p| p.parse::<u8>().ok()).collect::<Option<_>>()?;
    match parts[..] {
        [d, c, b, a] => Some(Ipv4Addr::new(a, b, c, d)),
        _ => None,
    }
}

/// Whether an IN-class question may be answered at all (anything else gets REFUSED).
pub fn is_internet(q: &Query) -> bool {
    q.qclass == CLASS_IN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut m = Vec::new();
        for v in [id, 0x0100, 1, 0, 0, 0] {
            m.extend_from_slice(&v.to_be_bytes());
        }
        push_labels(&mut m, name.split('.').map(str::as_bytes));
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m
    }

    #[test]
    fn parses_a_question_and_keeps_the_case_for_the_echo() {
        let m = query(0x1234, "WeB.TeSt", TYPE_A);
        let q = parse_query(&m).unwrap();
        assert_eq!((q.id, q.rd, q.name.as_str(), q.qtype), (0x1234, true, "web.test", TYPE_A));
        let r = build_response(&q, &Answer::A(Ipv4Addr::new(198, 18, 0, 1), 60));
        // Header: id, QR|RD|RA, one question, one answer.
        assert_eq!(&r[..12], &[0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
        // The question is echoed byte for byte, case included.
        assert_eq!(&r[12..m.len()], &m[12..]);
        // The record: pointer to the question's name, A, IN, TTL 60, 4 bytes.
        assert_eq!(&r[m.len()..], &[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 0, 1]);
    }

    #[test]
    fn follows_a_compression_pointer_backwards() {
        // A message holding "web.test" at offset 12 and, after it, "a" plus a pointer to it: the
        // second name reads as "a.web.test" and ends right after the pointer.
        let first = query(7, "web.test", TYPE_A);
        let mut msg = first[..first.len() - 4].to_vec();
        let second = msg.len();
        msg.extend_from_slice(&[1, b'A', 0xc0, 12, 0, 1, 0, 1]);
        let (labels, after) = read_name(&msg, second).unwrap();
        assert_eq!(labels, vec![b"A".to_vec(), b"web".to_vec(), b"test".to_vec()]);
        assert_eq!(after, second + 4, "the name ends after the pointer, not after its target");
        // A question "web" + pointer forward to "test" later in the message is refused.
        let mut fwd = first[..12].to_vec();
        fwd.extend_from_slice(&[3, b'w', b'e', b'b', 0xc0, 18, 0, 1, 0, 1, 0, 0, 4, b't', b'e', b's', b't', 0]);
        assert_eq!(parse_query(&fwd), Err(DnsError::BadName));
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let good = query(1, "web.test", TYPE_A);
        for cut in 0..good.len() {
            assert!(parse_query(&good[..cut]).is_err(), "a query cut at {cut} bytes is refused");
        }
        let mut response = good.clone();
        response[2] |= 0x80;
        assert_eq!(parse_query(&response), Err(DnsError::NotQuery));
        let mut two = good.clone();
        two[5] = 2;
        assert_eq!(parse_query(&two), Err(DnsError::NotQuery));
        let mut update = good.clone();
        update[2] |= 5 << 3;
        assert_eq!(parse_query(&update), Err(DnsError::NotQuery));
        // A pointer to itself loops: refused.
        let mut looped = good[..12].to_vec();
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_query(&looped), Err(DnsError::BadName));
        // A label with a dot or a space inside, a 64-byte label, the reserved 0x40 label type.
        for bad in [&b"\x03a.b\x00"[..], b"\x03a b\x00", b"\x40"] {
            let mut m = good[..12].to_vec();
            m.extend_from_slice(bad);
            m.extend_from_slice(&[0; 64 + 4]);
            assert_eq!(parse_query(&m), Err(DnsError::BadName), "{bad:?}");
        }
        // A name over 255 bytes.
        let long = vec!["a".repeat(63); 5].join(".");
        assert_eq!(parse_query(&query(1, &long, TYPE_A)), Err(DnsError::BadName));
        // Every single-byte corruption of a good query parses or fails cleanly.
        for i in 0..good.len() {
            for b in [0u8, 0x3f, 0xc0, 0xff] {
                let mut m = good.clone();
                m[i] = b;
                let _ = parse_query(&m);
            }
        }
    }

    #[test]
    fn error_codes_and_no_data_carry_no_records() {
        let q = parse_query(&query(9, "evil.test", TYPE_AAAA)).unwrap();
        for (answer, rcode) in [(Answer::NoData, 0), (Answer::ServFail, 2), (Answer::NxDomain, 3), (Answer::Refused, 5)] {
            let r = build_response(&q, &answer);
            assert_eq!(r[3] & 0x0f, rcode);
            assert_eq!(&r[6..8], &[0, 0], "no answer records");
            assert_eq!(r.len(), 12 + "evil.test".len() + 2 + 4);
            // What we build parses as a message with our question.
            assert_eq!(read_name(&r, 12).unwrap().0, q.labels);
        }
    }

    #[test]
    fn reverse_names_and_ptr_answers() {
        assert_eq!(ptr_address("7.0.18.198.in-addr.arpa"), Some(Ipv4Addr::new(198, 18, 0, 7)));
        assert_eq!(ptr_address("0.18.198.in-addr.arpa"), None);
        assert_eq!(ptr_address("web.test"), None);
        let q = parse_query(&query(3, "7.0.18.198.in-addr.arpa", TYPE_PTR)).unwrap();
        let r = build_response(&q, &Answer::Ptr("web.test".into(), 60));
        let data = &r[r.len() - 10..];
        assert_eq!(data, b"\x03web\x04test\x00");
        assert_eq!(&r[r.len() - 12..r.len() - 10], &[0, 10], "rdlength");
    }
}
