//! The kernel command line's `ip=` parameter, in the kernel's own format
//! (Documentation/admin-guide/nfs/nfsroot.rst):
//! `ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>`.
//! Only a static address is taken; DHCP is not done here yet.

use std::net::Ipv4Addr;

/// A static IPv4 configuration of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticIp {
    pub device: String,
    pub address: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpParamError {
    #[error("ip={value}: only a static address is supported (ip=<client>::<gateway>:<netmask>::<device>:off)")]
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

/// The static configuration `ip=` in `cmdline` asks for; `None` when there
/// is no `ip=`. The device defaults to eth0, as the one NIC of a hull VM.
pub fn parse_ip(cmdline: &str) -> Result<Option<StaticIp>, IpParamError> {
    let Some(value) = param(cmdline, "ip") else {
        return Ok(None);
    };
    let fields: Vec<&str> = value.split(':').collect();
    if fields.len() < 4 {
        return Err(IpParamError::Unsupported {
            value: value.to_owned(),
        });
    }
    let autoconf = fields.get(6).copied().unwrap_or("off");
    if !matches!(autoconf, "" | "off" | "none" | "static") {
        return Err(IpParamError::Unsupported {
            value: value.to_owned(),
        });
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
    let device = match fields.get(5).copied() {
        None | Some("") => "eth0".to_owned(),
        Some(name) => name.to_owned(),
    };
    Ok(Some(StaticIp {
        device,
        address: client,
        netmask,
        gateway,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_static_form_hull_vm_run_passes() {
        let line = "console=ttyS0 ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off quiet";
        assert_eq!(
            parse_ip(line),
            Ok(Some(StaticIp {
                device: "eth0".into(),
                address: Ipv4Addr::new(10, 0, 2, 15),
                netmask: Ipv4Addr::new(255, 255, 255, 0),
                gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            }))
        );
    }

    #[test]
    fn no_ip_parameter_means_no_configuration() {
        assert_eq!(parse_ip("console=ttyS0 quiet"), Ok(None));
        // A parameter that merely ends in "ip=" is another parameter.
        assert_eq!(parse_ip("vip=1.2.3.4"), Ok(None));
    }

    #[test]
    fn gateway_and_device_are_optional() {
        let ip = parse_ip("ip=192.168.1.5::::")
            .map(|_| ())
            .expect_err("no netmask");
        assert!(matches!(ip, IpParamError::NoNetmask { .. }));
        let ip = parse_ip("ip=192.168.1.5:::255.255.0.0")
            .expect("valid")
            .expect("present");
        assert_eq!(ip.gateway, None);
        assert_eq!(ip.device, "eth0");
        assert_eq!(ip.netmask, Ipv4Addr::new(255, 255, 0, 0));
    }

    #[test]
    fn dhcp_and_garbage_are_refused_with_the_value() {
        assert!(matches!(
            parse_ip("ip=dhcp"),
            Err(IpParamError::Unsupported { value }) if value == "dhcp"
        ));
        assert!(matches!(
            parse_ip("ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:dhcp"),
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
        let ip = parse_ip("ip=1.1.1.1:::255.0.0.0 ip=2.2.2.2:::255.0.0.0")
            .expect("valid")
            .expect("present");
        assert_eq!(ip.address, Ipv4Addr::new(2, 2, 2, 2));
    }
}
