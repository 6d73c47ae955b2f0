//! Picks the kernel modules an image needs out of an extracted kernel
//! package, with what they depend on, and writes their `modules.dep`.
//! Debian's package ships no modules.dep (depmod makes it at install), so
//! dependencies come from each module's own `.modinfo` section.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not an ELF64 kernel module with a .modinfo section")]
    NoModinfo { path: PathBuf },
    #[error("the kernel has no module {name} (neither built in nor under {dir})")]
    Unknown { name: String, dir: PathBuf },
}

/// A module's name as the kernel knows it: the file's stem, with dashes
/// as underscores.
pub fn module_name(file_name: &str) -> String {
    file_name.trim_end_matches(".ko").replace('-', "_")
}

/// The modules `wanted` needs, by path relative to `release_dir`, each
/// with the paths of everything it depends on; modules built into the
/// kernel (modules.builtin) are left out.
pub fn select(
    release_dir: &Path,
    wanted: &[&str],
) -> Result<BTreeMap<String, Vec<String>>, KmodError> {
    let builtin_path = release_dir.join("modules.builtin");
    let builtin: BTreeSet<String> = fs::read_to_string(&builtin_path)
        .map_err(|source| KmodError::Read {
            path: builtin_path,
            source,
        })?
        .lines()
        .filter_map(|line| line.rsplit('/').next())
        .map(module_name)
        .collect();
    let mut index = HashMap::new();
    index_modules(release_dir, &release_dir.join("kernel"), &mut index)?;
    let mut selected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut queue: Vec<String> = wanted.iter().map(|w| module_name(w)).collect();
    let mut direct: BTreeMap<String, Vec<String>> = BTreeMap::new();
    while let Some(name) = queue.pop() {
        if builtin.contains(&name) || direct.contains_key(&name) {
            continue;
        }
        let Some(relative) = index.get(&name) else {
            return Err(KmodError::Unknown {
                name,
                dir: release_dir.to_path_buf(),
            });
        };
        let deps: Vec<String> = depends(&release_dir.join(relative))?
            .into_iter()
            .filter(|d| !builtin.contains(d))
            .collect();
        queue.extend(deps.iter().cloned());
        direct.insert(name, deps);
    }
    // modules.dep lists every module a module needs, not only its direct
    // dependencies.
    for name in direct.keys() {
        let mut all = BTreeSet::new();
        let mut stack = direct[name].clone();
        while let Some(dep) = stack.pop() {
            if all.insert(dep.clone()) {
                stack.extend(direct.get(&dep).cloned().unwrap_or_default());
            }
        }
        let paths = all.iter().filter_map(|d| index.get(d).cloned()).collect();
        if let Some(path) = index.get(name) {
            selected.insert(path.clone(), paths);
        }
    }
    Ok(selected)
}

/// modules.dep's text for `selected`.
pub fn modules_dep(selected: &BTreeMap<String, Vec<String>>) -> String {
    selected
        .iter()
        .map(|(module, deps)| {
            if deps.is_empty() {
                format!("{module}:\n")
            } else {
                format!("{module}: {}\n", deps.join(" "))
            }
        })
        .collect()
}

fn index_modules(
    release_dir: &Path,
    dir: &Path,
    index: &mut HashMap<String, String>,
) -> Result<(), KmodError> {
    let read_error = |source| KmodError::Read {
        path: dir.to_path_buf(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let path = entry.path();
        if entry.file_type().map_err(read_error)?.is_dir() {
            index_modules(release_dir, &path, index)?;
        } else if let Some(file_name) = path.file_name().and_then(|n| n.to_str()) {
            if file_name.ends_with(".ko") {
                if let Ok(relative) = path.strip_prefix(release_dir) {
                    index.insert(
                        module_name(file_name),
                        relative.to_string_lossy().into_owned(),
                    );
                }
            }
        }
    }
    Ok(())
}

/// The `depends=` of a module's `.modinfo` section.
fn depends(path: &Path) -> Result<Vec<String>, KmodError> {
    let bytes = fs::read(path).map_err(|source| KmodError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let modinfo = elf_section(&bytes, ".modinfo").ok_or_else(|| KmodError::NoModinfo {
        path: path.to_path_buf(),
    })?;
    let mut names = Vec::new();
    for field in modinfo.split(|b| *b == 0) {
        if let Some(list) = field.strip_prefix(b"depends=") {
            for name in String::from_utf8_lossy(list).split(',') {
                if !name.is_empty() {
                    names.push(module_name(name));
                }
            }
        }
    }
    Ok(names)
}

/// A section of a little-endian ELF64 file, by name.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // ELFCLASS64, ELFDATA2LSB.
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        return None;
    }
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    let section = |index: usize| -> Option<(u32, &'a [u8])> {
        let at = shoff + index * shentsize;
        let name = u32_at(at)?;
        let offset = usize::try_from(u64_at(at + 0x18)?).ok()?;
        let size = usize::try_from(u64_at(at + 0x20)?).ok()?;
        Some((name, elf.get(offset..offset.checked_add(size)?)?))
    };
    let (_, names) = section(shstrndx)?;
    (0..shnum).find_map(|index| {
        let (name_at, data) = section(index)?;
        let name = names.get(usize::try_from(name_at).ok()?..)?;
        let end = name.iter().position(|b| *b == 0)?;
        (&name[..end] == wanted.as_bytes()).then_some(data)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_use_underscores() {
        assert_eq!(module_name("virtio-rng.ko"), "virtio_rng");
        assert_eq!(module_name("virtio_net"), "virtio_net");
    }

    #[test]
    fn modules_dep_has_one_line_per_module() {
        let mut selected = BTreeMap::new();
        selected.insert("kernel/a.ko".to_owned(), vec!["kernel/b.ko".to_owned()]);
        selected.insert("kernel/b.ko".to_owned(), vec![]);
        assert_eq!(
            modules_dep(&selected),
            "kernel/a.ko: kernel/b.ko\nkernel/b.ko:\n"
        );
    }

    #[test]
    fn finds_a_section_by_name_and_refuses_what_is_not_elf() {
        assert_eq!(elf_section(b"not an elf at all", ".modinfo"), None);
        // This test binary is an ELF64 file with a .text section, and has
        // no .modinfo.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(elf_section(&me, ".text").is_some_and(|t| !t.is_empty()));
        assert_eq!(elf_section(&me, ".modinfo"), None);
    }
}
