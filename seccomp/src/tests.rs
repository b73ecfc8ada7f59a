use super::*;

#[test]
fn every_kind_compiles_in_both_modes() {
    for mode in [Mode::Enforce, Mode::Log] {
        let programs = compile(mode).unwrap();
        assert_eq!(programs.len(), Kind::ALL.len());
    }
}

#[test]
fn kind_names_round_trip() {
    for k in Kind::ALL {
        assert_eq!(Kind::from_name(k.name()), Some(k));
        assert_eq!(Kind::ALL[usize::from(k.index())], k);
    }
}

#[test]
fn the_spawner_may_call_what_every_kind_may() {
    let spawner = filters::rules(Kind::Spawn);
    for k in Kind::ALL {
        for (call, conds) in filters::rules(k) {
            let mine = spawner
                .get(&call)
                .unwrap_or_else(|| panic!("{} allows {call}, the spawner not", k.name()));
            assert!(
                mine.is_empty() || conds.iter().all(|c| mine.contains(c)),
                "{} allows {call} more widely than the spawner",
                k.name()
            );
        }
    }
}

#[test]
fn no_kind_allows_the_probe_or_exec() {
    for k in Kind::ALL {
        let rules = filters::rules(k);
        for call in [libc::SYS_personality, libc::SYS_execve, libc::SYS_execveat] {
            assert!(!rules.contains_key(&call), "{} allows {call}", k.name());
        }
    }
}

#[test]
fn names_come_from_the_table() {
    assert_eq!(trap::syscall_name(libc::SYS_personality), PROBE_SYSCALL);
    assert_eq!(trap::syscall_name(100_000), "syscall_100000");
}
