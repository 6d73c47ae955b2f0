//! Kernel modules from `/lib/modules/<release>/modules.dep`, loaded with
//! finit_module(2) in dependency order: there is no modprobe in the image.

use std::collections::{HashMap, HashSet};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DepError {
    #[error("modules.dep line {line}: no \":\" after the module's path")]
    Malformed { line: usize },
    #[error("modules.dep: {module} depends on {dependency}, which has no line of its own")]
    Missing { module: String, dependency: String },
    #[error("modules.dep: {module} depends on itself through {through}")]
    Cycle { module: String, through: String },
}

/// Every module `modules.dep` lists, each after all it depends on (paths as
/// written there, relative to the release's module directory).
pub fn load_order(modules_dep: &str) -> Result<Vec<String>, DepError> {
    let mut deps: Vec<(&str, Vec<&str>)> = Vec::new();
    for (index, line) in modules_dep.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (module, rest) = line
            .split_once(':')
            .ok_or(DepError::Malformed { line: index + 1 })?;
        deps.push((module.trim(), rest.split_ascii_whitespace().collect()));
    }
    let table: HashMap<&str, &[&str]> = deps.iter().map(|(m, d)| (*m, d.as_slice())).collect();
    let mut order = Vec::new();
    let mut done = HashSet::new();
    for (module, _) in &deps {
        visit(module, &table, &mut Vec::new(), &mut done, &mut order)?;
    }
    Ok(order)
}

fn visit<'a>(
    module: &'a str,
    table: &HashMap<&'a str, &'a [&'a str]>,
    path: &mut Vec<&'a str>,
    done: &mut HashSet<&'a str>,
    order: &mut Vec<String>,
) -> Result<(), DepError> {
    if done.contains(module) {
        return Ok(());
    }
    if path.contains(&module) {
        return Err(DepError::Cycle {
            module: module.to_owned(),
            through: path.last().copied().unwrap_or(module).to_owned(),
        });
    }
    let Some(dependencies) = table.get(module) else {
        return Err(DepError::Missing {
            module: path.last().copied().unwrap_or(module).to_owned(),
            dependency: module.to_owned(),
        });
    };
    path.push(module);
    // modules.dep lists a module's dependencies nearest first; any order
    // is fine here since each is visited depth first.
    for dependency in dependencies.iter() {
        visit(dependency, table, path, done, order)?;
    }
    path.pop();
    done.insert(module);
    order.push(module.to_owned());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
";

    fn position(order: &[String], name: &str) -> usize {
        order
            .iter()
            .position(|m| m.ends_with(name))
            .unwrap_or_else(|| panic!("{name} missing from {order:?}"))
    }

    #[test]
    fn every_module_comes_after_what_it_depends_on_once() {
        let order = load_order(DEP).expect("valid");
        assert_eq!(order.len(), 6, "{order:?}");
        assert!(position(&order, "/failover.ko") < position(&order, "/net_failover.ko"));
        assert!(position(&order, "/net_failover.ko") < position(&order, "/virtio_net.ko"));
        assert!(position(&order, "/virtio.ko") < position(&order, "/virtio_net.ko"));
        assert!(position(&order, "/virtio_ring.ko") < position(&order, "/virtio_pci.ko"));
    }

    #[test]
    fn a_missing_dependency_and_a_cycle_are_named() {
        assert_eq!(
            load_order("a.ko: b.ko\n"),
            Err(DepError::Missing {
                module: "a.ko".into(),
                dependency: "b.ko".into()
            })
        );
        assert!(matches!(
            load_order("a.ko: b.ko\nb.ko: a.ko\n"),
            Err(DepError::Cycle { .. })
        ));
        assert_eq!(
            load_order("a.ko b.ko\n"),
            Err(DepError::Malformed { line: 1 })
        );
        assert_eq!(load_order(""), Ok(vec![]));
    }
}
