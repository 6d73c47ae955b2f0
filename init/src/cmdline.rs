//! The kernel command line's `ip=` parameter, in the kernel's own format
//! (Documentation/admin-guide/nfs/nfsroot.rst):
//! `ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>`.
//! A static address, DHCP (`ip=dhcp`, `ip=on`, `ip=any`, or `dhcp` as the
//! autoconf field), or nothing (`ip=off`, `ip=none`); BOOTP and RARP are
//! refused. What no `ip=` at all means is hull-init's choice (`main`).

use std::net::Ipv4Addr;

/// A static IPv4 configuration of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticIp {
    pub device: String,
    pub address: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
}

/// What `ip=` asks of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpConfig {
    Static(StaticIp),
    /// An address from a DHCPv4 server on `device`.
    Dhcp {
        device: String,
    },
    /// Leave the interfaces down.
    Off,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpParamError {
    #[error("ip={value}: expected a static address (ip=<client>::<gateway>:<netmask>::<device>:off), ip=dhcp or ip=off")]
    Unsupported { value: String },
    #[error("ip={value}: {field} {text:?} is not an IPv4 address")]
    BadAddress {
        value: String,
        field: &'static str,
        text: String,
    },
    #[error("ip={value}: no netmask")]
    NoNetmask { value: String },
}

/// The value of the last `key=value` word of `cmdline`, as the kernel
/// takes the last of a repeated parameter.
pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

/// The configuration `ip=` in `cmdline` asks for; `None` when there is no
/// `ip=`. The device defaults to eth0, as the one NIC of a hull VM.
pub fn parse_ip(cmdline: &str) -> Result<Option<IpConfig>, IpParamError> {
    let Some(value) = param(cmdline, "ip") else {
        return Ok(None);
    };
    let unsupported = || IpParamError::Unsupported {
        value: value.to_owned(),
    };
    // The kernel's one-word forms.
    match value {
        "dhcp" | "on" | "any" => {
            return Ok(Some(IpConfig::Dhcp {
                device: DEFAULT_DEVICE.to_owned(),
            }))
        }
        "off" | "none" => return Ok(Some(IpConfig::Off)),
        _ => {}
    }
    let fields: Vec<&str> = value.split(':').collect();
    let device = match fields.get(5).copied() {
        None | Some("") => DEFAULT_DEVICE.to_owned(),
        Some(name) => name.to_owned(),
    };
    let autoconf = fields.get(6).copied().unwrap_or("off");
    match autoconf {
        "" | "off" | "none" | "static" => {}
        // `ip=:::::eth0:dhcp`: the fields before are hints a client may
        // ignore, and this one does.
        "dhcp" | "on" | "any" => return Ok(Some(IpConfig::Dhcp { device })),
        _ => return Err(unsupported()),
    }
    if fields.len() < 4 {
        return Err(unsupported());
    }
    let address = |field: &'static str, text: &str| {
        text.parse::<Ipv4Addr>()
            .map_err(|_| IpParamError::BadAddress {
                value: value.to_owned(),
                field,
                text: text.to_owned(),
            })
    };
    let client = address("client address", fields[0])?;
    let gateway = match fields[2] {
        "" => None,
        text => Some(address("gateway", text)?),
    };
    let netmask = match fields[3] {
        "" => {
            return Err(IpParamError::NoNetmask {
                value: value.to_owned(),
            })
        }
        text => address("netmask", text)?,
    };
    Ok(Some(IpConfig::Static(StaticIp {
        device,
        address: client,
        netmask,
        gateway,
    })))
}

/// The one NIC of a hull VM.
pub const DEFAULT_DEVICE: &str = "eth0";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_static_form_hull_vm_run_passes() {
        let line = "console=ttyS0 ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off quiet";
        assert_eq!(
            parse_ip(line),
            Ok(Some(IpConfig::Static(StaticIp {
                device: "eth0".into(),
                address: Ipv4Addr::new(10, 0, 2, 15),
                netmask: Ipv4Addr::new(255, 255, 255, 0),
                gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            })))
        );
    }

    #[test]
    fn no_ip_parameter_means_no_configuration() {
        assert_eq!(parse_ip("console=ttyS0 quiet"), Ok(None));
        // A parameter that merely ends in "ip=" is another parameter.
        assert_eq!(parse_ip("vip=1.2.3.4"), Ok(None));
    }

    fn static_ip(line: &str) -> StaticIp {
        match parse_ip(line) {
            Ok(Some(IpConfig::Static(ip))) => ip,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn gateway_and_device_are_optional() {
        let ip = parse_ip("ip=192.168.1.5::::")
            .map(|_| ())
            .expect_err("no netmask");
        assert!(matches!(ip, IpParamError::NoNetmask { .. }));
        let ip = static_ip("ip=192.168.1.5:::255.255.0.0");
        assert_eq!(ip.gateway, None);
        assert_eq!(ip.device, "eth0");
        assert_eq!(ip.netmask, Ipv4Addr::new(255, 255, 0, 0));
    }

    #[test]
    fn dhcp_in_each_of_the_kernels_spellings() {
        let eth0 = IpConfig::Dhcp {
            device: "eth0".into(),
        };
        for line in [
            "ip=dhcp",
            "ip=on",
            "ip=any",
            "ip=:::::eth0:dhcp",
            "ip=::::::dhcp",
        ] {
            assert_eq!(parse_ip(line), Ok(Some(eth0.clone())), "{line}");
        }
        // The autoconf field wins over the static fields before it.
        assert_eq!(
            parse_ip("ip=10.0.2.15::10.0.2.2:255.255.255.0::eth1:dhcp"),
            Ok(Some(IpConfig::Dhcp {
                device: "eth1".into()
            }))
        );
        assert_eq!(parse_ip("ip=off"), Ok(Some(IpConfig::Off)));
        assert_eq!(parse_ip("ip=none"), Ok(Some(IpConfig::Off)));
    }

    #[test]
    fn bootp_rarp_and_garbage_are_refused_with_the_value() {
        assert!(matches!(
            parse_ip("ip=bootp"),
            Err(IpParamError::Unsupported { value }) if value == "bootp"
        ));
        assert!(matches!(
            parse_ip("ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:rarp"),
            Err(IpParamError::Unsupported { .. })
        ));
        assert!(matches!(
            parse_ip("ip=10.0.2.x::10.0.2.2:255.255.255.0::eth0:off"),
            Err(IpParamError::BadAddress {
                field: "client address",
                ..
            })
        ));
    }

    #[test]
    fn hulls_parameters_are_found_by_their_whole_key() {
        let line = "console=ttyS0 hull.data=/dev/vdb hull.host_token=0123abcd:ff xhull.data=/x";
        assert_eq!(param(line, "hull.data"), Some("/dev/vdb"));
        assert_eq!(param(line, "hull.host_token"), Some("0123abcd:ff"));
        assert_eq!(param(line, "hull.dat"), None);
        assert_eq!(param(line, "hull.cgroup"), None);
    }

    #[test]
    fn the_last_ip_parameter_wins_as_in_the_kernel() {
        let ip = static_ip("ip=1.1.1.1:::255.0.0.0 ip=2.2.2.2:::255.0.0.0");
        assert_eq!(ip.address, Ipv4Addr::new(2, 2, 2, 2));
    }
}
