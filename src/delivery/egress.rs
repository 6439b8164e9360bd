//! The egress policy: which addresses deliveries may connect to.
//!
//! Webhook URLs come from templates and from recipients' channel_data (which
//! anyone with an API key can write), so without a policy herald could be
//! pointed at cloud metadata services or link-local addresses. The policy is
//! applied to the addresses a host resolves to, not to its name, so a name
//! that resolves to a refused address is refused too.
//!
//! This module is the pure part (CIDR parsing, matching, the decision and the
//! rule behind it); [`crate::delivery::http`] applies it in reqwest's
//! resolver and to IP-literal URLs, [`crate::delivery::email`] to SMTP hosts.
//!
//! Precedence, for one address: an entry of the allow list that covers it
//! permits it; otherwise a default rule or an entry of the deny list that
//! covers it refuses it (the most specific such rule is named); otherwise it
//! is permitted. An address "covers" also through its IPv4 form when it is an
//! IPv4-mapped (`::ffff:a.b.c.d`) or NAT64 (`64:ff9b::a.b.c.d`) address, since
//! connecting to those reaches the IPv4 address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;

/// A CIDR block of the operator's settings: `10.0.0.0/8`, `fd00::/8`, or a
/// bare address (a /32 or /128). Host bits are ignored (`10.1.2.3/8` is `10.0.0.0/8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(IpNet);

/// A settings entry that is not a CIDR block.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a CIDR block or IP address (like 10.0.0.0/8, fd00::/8 or 192.0.2.1)")]
pub struct InvalidCidr(String);

impl FromStr for Cidr {
    type Err = InvalidCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let entry = s.trim();
        let net = if entry.contains('/') { entry.parse::<IpNet>().map(|n| n.trunc()).ok() } else { entry.parse::<IpAddr>().map(IpNet::from).ok() };
        net.map(Cidr).ok_or_else(|| InvalidCidr(entry.to_string()))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A comma-separated list of CIDR blocks, as a flag or environment variable
/// gives it. Empty entries are skipped, so an empty variable is an empty list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

impl FromStr for CidrList {
    type Err = InvalidCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',').filter(|entry| !entry.trim().is_empty()).map(str::parse).collect::<Result<_, _>>().map(CidrList)
    }
}

impl fmt::Display for CidrList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = self.0.iter().map(Cidr::to_string).collect();
        f.write_str(&entries.join(","))
    }
}

/// A rule that refuses addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Built in, with what it protects: `cloud metadata`, `link-local`, `unspecified address`.
    Default { net: IpNet, what: &'static str },
    /// An entry of `--egress-deny-cidrs`.
    Deny(IpNet),
}

impl Rule {
    fn net(&self) -> &IpNet {
        match self {
            Rule::Default { net, .. } | Rule::Deny(net) => net,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Default { what, .. } => write!(f, "default: {what}"),
            Rule::Deny(net) => write!(f, "--egress-deny-cidrs {net}"),
        }
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> IpNet {
    IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), prefix)
}

const fn v6(segments: [u16; 8], prefix: u8) -> IpNet {
    let [a, b, c, d, e, f, g, h] = segments;
    IpNet::new_assert(IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)), prefix)
}

/// The rules that hold whatever the settings say (unless the allow list overrides them).
pub const DEFAULT_RULES: [(IpNet, &str); 7] = [
    // AWS, GCP, Azure, OpenStack and most others; AWS's IPv6 (Nitro); Alibaba Cloud.
    (v4(169, 254, 169, 254, 32), "cloud metadata"),
    (v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128), "cloud metadata"),
    (v4(100, 100, 100, 200, 32), "cloud metadata"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    // Connecting to 0.0.0.0 or :: reaches the local host on Linux.
    (v4(0, 0, 0, 0, 32), "unspecified address"),
    (v6([0; 8], 128), "unspecified address"),
];

/// The well-known NAT64 prefix (RFC 6052): a NAT64 gateway forwards
/// `64:ff9b::a.b.c.d` to the IPv4 address a.b.c.d.
const NAT64: IpNet = v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);

/// An address the policy refuses, and the rule that refuses it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{address} is refused by the egress policy ({rule})")]
pub struct Refused {
    pub address: IpAddr,
    pub rule: Rule,
}

/// A delivery stopped by the policy: the host it was for and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct EgressDenied {
    /// The host as written in the URL or the SMTP settings.
    pub host: String,
    /// The first refused address (of those the host resolved to).
    pub refused: Refused,
}

impl fmt::Display for EgressDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // An IP-literal host says it all; a name says what it resolved to.
        let literal = self.host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok();
        if literal {
            write!(f, "{}", self.refused)
        } else {
            write!(f, "`{}` resolves to {}, which is refused by the egress policy ({})", self.host, self.refused.address, self.refused.rule)
        }
    }
}

/// Which addresses deliveries may connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressPolicy {
    deny: Vec<Rule>,
    allow: Vec<IpNet>,
}

impl Default for EgressPolicy {
    /// The default rules alone.
    fn default() -> Self {
        EgressPolicy::new(&[], &[])
    }
}

impl EgressPolicy {
    /// The default rules plus `deny`, with `allow` taking precedence over both.
    pub fn new(deny: &[Cidr], allow: &[Cidr]) -> Self {
        let mut rules: Vec<Rule> = DEFAULT_RULES.iter().map(|(net, what)| Rule::Default { net: *net, what }).collect();
        rules.extend(deny.iter().map(|c| Rule::Deny(c.0)));
        EgressPolicy { deny: rules, allow: allow.iter().map(|c| c.0).collect() }
    }

    /// Whether deliveries may connect to `address`; if not, the rule that refuses it.
    pub fn check(&self, address: IpAddr) -> Result<(), Refused> {
        let forms = forms(address);
        let covers = |net: &IpNet| forms.iter().flatten().any(|a| net.contains(a));
        if self.allow.iter().any(covers) {
            return Ok(());
        }
        // The most specific rule names the refusal best (cloud metadata rather than link-local).
        match self.deny.iter().filter(|r| covers(r.net())).max_by_key(|r| r.net().prefix_len()) {
            Some(rule) => Err(Refused { address, rule: rule.clone() }),
            None => Ok(()),
        }
    }

    /// The addresses `host` resolved to that deliveries may use, in their
    /// order; an error when every one is refused. (None at all is not a
    /// refusal: the caller reports that the name does not resolve.)
    pub fn permitted(&self, host: &str, addresses: impl IntoIterator<Item = SocketAddr>) -> Result<Vec<SocketAddr>, EgressDenied> {
        let mut permitted = Vec::new();
        let mut first_refusal = None;
        for address in addresses {
            match self.check(address.ip()) {
                Ok(()) => permitted.push(address),
                Err(refused) => {
                    first_refusal.get_or_insert(refused);
                }
            }
        }
        match first_refusal {
            Some(refused) if permitted.is_empty() => Err(EgressDenied { host: host.to_string(), refused }),
            _ => Ok(permitted),
        }
    }

    /// Checks every address `host` resolved to: an error naming the first
    /// refused one. For clients that connect by name themselves and may pick
    /// any of the addresses (lettre).
    pub fn check_every(&self, host: &str, addresses: impl IntoIterator<Item = SocketAddr>) -> Result<(), EgressDenied> {
        for address in addresses {
            self.check(address.ip()).map_err(|refused| EgressDenied { host: host.to_string(), refused })?;
        }
        Ok(())
    }
}

/// The address itself, and the IPv4 address it reaches when it is IPv4-mapped or NAT64.
fn forms(address: IpAddr) -> [Option<IpAddr>; 2] {
    let embedded = match address {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Some(IpAddr::V4(v4)),
            None if NAT64.contains(&address) => {
                let [.., a, b, c, d] = v6.octets();
                Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
            }
            None => None,
        },
    };
    [Some(address), embedded]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The rule's text when refused, None when permitted.
    fn verdict(policy: &EgressPolicy, address: &str) -> Option<String> {
        policy.check(ip(address)).err().map(|r| r.rule.to_string())
    }

    #[test]
    fn cidrs_parse_blocks_and_bare_addresses() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(" 10.1.2.3/8 ".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8", "host bits are ignored");
        assert_eq!("192.0.2.1".parse::<Cidr>().unwrap().to_string(), "192.0.2.1/32");
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        for bad in ["", "10.0.0.0/33", "example.com", "10.0.0/8", "10.0.0.0/", "fe80::/129", "1.2.3.4/8/8"] {
            let err = bad.parse::<Cidr>().expect_err(bad);
            assert!(err.to_string().contains("is not a CIDR block"), "{err}");
        }
    }

    #[test]
    fn lists_are_comma_separated_and_may_be_empty() {
        assert_eq!("".parse::<CidrList>().unwrap(), CidrList::default());
        let list: CidrList = " 127.0.0.0/8, ::1 ,".parse().unwrap();
        assert_eq!(list.to_string(), "127.0.0.0/8,::1/128");
        let err = "10.0.0.0/8,example.com".parse::<CidrList>().unwrap_err();
        assert_eq!(err.to_string(), "`example.com` is not a CIDR block or IP address (like 10.0.0.0/8, fd00::/8 or 192.0.2.1)");
    }

    #[test]
    fn defaults_refuse_metadata_link_local_and_unspecified() {
        let policy = EgressPolicy::default();
        for (address, rule) in [
            ("169.254.169.254", "default: cloud metadata"),
            ("fd00:ec2::254", "default: cloud metadata"),
            ("100.100.100.200", "default: cloud metadata"),
            ("169.254.1.1", "default: link-local"),
            ("fe80::1", "default: link-local"),
            ("febf::1", "default: link-local"),
            ("0.0.0.0", "default: unspecified address"),
            ("::", "default: unspecified address"),
            // The IPv4-mapped and NAT64 forms of refused IPv4 addresses.
            ("::ffff:169.254.169.254", "default: cloud metadata"),
            ("::ffff:a9fe:1", "default: link-local"),
            ("::ffff:0.0.0.0", "default: unspecified address"),
            ("64:ff9b::169.254.169.254", "default: cloud metadata"),
        ] {
            assert_eq!(verdict(&policy, address).as_deref(), Some(rule), "{address}");
        }
        for address in
            ["127.0.0.1", "::1", "10.0.0.1", "192.168.1.1", "100.100.100.201", "8.8.8.8", "2001:db8::1", "fec0::1", "fd00:ec2::253", "::ffff:8.8.8.8", "64:ff9b::808:808"]
        {
            assert_eq!(verdict(&policy, address), None, "{address}");
        }
    }

    #[test]
    fn deny_entries_add_to_the_defaults() {
        let policy = EgressPolicy::new(&cidrs(&["127.0.0.0/8", "10.0.0.0/8", "fd00::/8"]), &[]);
        assert_eq!(verdict(&policy, "127.0.0.1").as_deref(), Some("--egress-deny-cidrs 127.0.0.0/8"));
        assert_eq!(verdict(&policy, "::ffff:127.0.0.1").as_deref(), Some("--egress-deny-cidrs 127.0.0.0/8"));
        assert_eq!(verdict(&policy, "10.96.0.1").as_deref(), Some("--egress-deny-cidrs 10.0.0.0/8"));
        // The most specific rule is named: fd00:ec2::254 is in fd00::/8 too.
        assert_eq!(verdict(&policy, "fd00:ec2::254").as_deref(), Some("default: cloud metadata"));
        assert_eq!(verdict(&policy, "fd00::1").as_deref(), Some("--egress-deny-cidrs fd00::/8"));
        assert_eq!(verdict(&policy, "169.254.169.254").as_deref(), Some("default: cloud metadata"));
        assert_eq!(verdict(&policy, "192.168.0.1"), None);
    }

    #[test]
    fn allow_entries_win_over_defaults_and_deny_entries() {
        let policy = EgressPolicy::new(&cidrs(&["127.0.0.0/8"]), &cidrs(&["127.0.0.1/32", "169.254.10.0/24"]));
        assert_eq!(verdict(&policy, "127.0.0.1"), None);
        assert_eq!(verdict(&policy, "::ffff:127.0.0.1"), None, "the mapped form of an allowed address");
        assert_eq!(verdict(&policy, "127.0.0.2").as_deref(), Some("--egress-deny-cidrs 127.0.0.0/8"));
        assert_eq!(verdict(&policy, "169.254.10.7"), None, "allowed over the link-local default");
        assert_eq!(verdict(&policy, "169.254.169.254").as_deref(), Some("default: cloud metadata"));
        // Allowing everything turns the policy off.
        let open = EgressPolicy::new(&[], &cidrs(&["0.0.0.0/0", "::/0"]));
        assert_eq!(verdict(&open, "169.254.169.254"), None);
        assert_eq!(verdict(&open, "fd00:ec2::254"), None);
    }

    #[test]
    fn names_are_refused_only_when_every_address_is() {
        let policy = EgressPolicy::new(&cidrs(&["127.0.0.0/8"]), &[]);
        let addr = |s: &str| SocketAddr::new(ip(s), 0);
        let mixed = [addr("127.0.0.1"), addr("::1"), addr("169.254.169.254")];
        assert_eq!(policy.permitted("localhost", mixed), Ok(vec![addr("::1")]));
        let err = policy.permitted("localhost", [addr("127.0.0.1"), addr("169.254.169.254")]).unwrap_err();
        assert_eq!(err.to_string(), "`localhost` resolves to 127.0.0.1, which is refused by the egress policy (--egress-deny-cidrs 127.0.0.0/8)");
        assert_eq!(policy.permitted("nothing", []), Ok(vec![]), "no address is not a refusal");
        // Every address must pass when the client picks one itself.
        let err = policy.check_every("mail", mixed).unwrap_err();
        assert_eq!(err.refused.address, ip("127.0.0.1"));
        assert!(policy.check_every("mail", [addr("::1")]).is_ok());
        // An IP-literal host is not repeated.
        let err = policy.check_every("169.254.169.254", [addr("169.254.169.254")]).unwrap_err();
        assert_eq!(err.to_string(), "169.254.169.254 is refused by the egress policy (default: cloud metadata)");
        let err = policy.check_every("[::ffff:127.0.0.1]", [addr("::ffff:127.0.0.1")]).unwrap_err();
        assert_eq!(err.to_string(), "::ffff:127.0.0.1 is refused by the egress policy (--egress-deny-cidrs 127.0.0.0/8)");
    }
}
