//! The main job end to end: `boxlite run` boots a real guest (QEMU, TCG here) from a real OCI
//! image made with umoci, and Box lifecycle commands keep the state right.

mod support;

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::{processes_mentioning, Env};

#[test]
fn run_prints_output_and_returns_the_exit_status() {
    let env = Env::new();
    let img = env.busybox();

    let out = env.run(&["run", "--rm", img, "echo", "hello"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert_eq!(out.status.code(), Some(0));

    let out = env.run(&["run", "--rm", img, "sh", "-c", "exit 7"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = env.run(&[
        "run",
        "--rm",
        img,
        "sh",
        "-c",
        "echo to-out; echo to-err >&2",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "to-out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-err\n"));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("to-err"),
        "stderr stays stderr"
    );

    let out = env.run(&["run", "--rm", img, "no-such-command"]);
    assert_eq!(
        out.status.code(),
        Some(127),
        "a missing command exits 127 as in docker"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-command"));

    assert_eq!(
        std::fs::read_dir(env.boxes_dir()).unwrap().count(),
        0,
        "--rm leaves nothing"
    );
}

#[test]
fn fifty_megabytes_of_stdout_arrive_byte_exact() {
    let env = Env::new();
    let img = env.busybox();
    let size = 50 * 1024 * 1024;
    let script = format!("yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {size}");
    let out = env.run(&["run", "--rm", img, "sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(0));
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz\n";
    let expected: Vec<u8> = line.iter().copied().cycle().take(size).collect();
    assert_eq!(out.stdout.len(), size);
    assert_eq!(
        hex::encode(Sha256::digest(&out.stdout)),
        hex::encode(Sha256::digest(&expected)),
        "content differs"
    );
}

#[test]
fn a_box_keeps_its_files_across_stop_and_start_and_a_new_box_does_not_see_them() {
    let env = Env::new();
    let img = env.busybox();
    env.ok(&["run", "-d", "--name", "keeper", img, "sleep", "1000"]);
    env.ok(&[
        "exec",
        "keeper",
        "sh",
        "-c",
        "echo precious > /root/state.txt",
    ]);
    env.ok(&["stop", "keeper"]);
    assert_eq!(env.state_of("keeper")["state"], "exited");
    env.ok(&["start", "keeper"]);
    assert_eq!(
        env.ok(&["exec", "keeper", "cat", "/root/state.txt"]),
        "precious\n"
    );

    env.ok(&["run", "-d", "--name", "fresh", img, "sleep", "1000"]);
    let out = env.run(&["exec", "fresh", "cat", "/root/state.txt"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a new Box of the same image starts from the image"
    );
    env.ok(&["rm", "-f", "keeper", "fresh"]);
}

#[test]
fn detached_box_exec_from_another_process_then_stop_and_rm() {
    let env = Env::new();
    let img = env.busybox();
    let id = env.ok(&["run", "-d", "--name", "worker", img, "sleep", "1000"]);
    assert_eq!(id.trim().len(), 32, "run -d prints the Box id");
    let b = env.state_of("worker");
    assert_eq!(b["state"], "running");
    assert!(b["vmm_pid"].as_i64().is_some() && b["shim_pid"].as_i64().is_some());
    assert_eq!(
        env.ok(&["start", "worker"]),
        "worker\n",
        "starting a running Box is not an error"
    );

    // A second, independent CLI process reaches the same Box through its shim.
    let out = env.ok(&[
        "exec",
        "-e",
        "GREETING=hi",
        "-w",
        "/tmp",
        "worker",
        "sh",
        "-c",
        "echo $GREETING from $(pwd) as $(id -u)",
    ]);
    assert_eq!(out, "hi from /tmp as 0\n");
    let out = env.ok(&["exec", "-u", "tester", "worker", "id"]);
    assert!(
        out.starts_with("uid=1000(tester) gid=1000(tester)"),
        "{out}"
    );
    let out = env.run(&["exec", "worker", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));

    env.ok(&["stop", "worker"]);
    let b = env.state_of("worker");
    assert_eq!(b["state"], "exited");
    assert_eq!(b["exit_reason"], "stopped");
    assert!(b["vmm_pid"].is_null());
    let out = env.run(&["exec", "worker", "true"]);
    assert_ne!(out.status.code(), Some(0), "exec into a stopped Box fails");
    assert!(String::from_utf8_lossy(&out.stderr).contains("exited"));

    env.ok(&["rm", "worker"]);
    assert!(env.ls().is_empty());
}

/// `stop -t N` as docker has it: SIGTERM, then N seconds for the processes to finish before
/// SIGKILL; a trap that cleans up within the time gets to finish, one that takes longer does not.
#[test]
fn stop_gives_processes_their_time_after_sigterm() {
    let env = Env::new();
    let img = env.busybox();
    let script = "trap 'sleep 4; echo cleaned > /root/clean; sync; exit 0' TERM; \
                  cat /proc/sys/kernel/random/boot_id > /tmp/armed; \
                  while :; do sleep 1; done";
    // Armed in this boot (the file stays on the Box's disk across stop/start).
    let this_boot = "test \"$(cat /tmp/armed)\" = \"$(cat /proc/sys/kernel/random/boot_id)\"";
    let armed = |env: &Env| {
        let started = Instant::now();
        while env
            .run(&["exec", "trapper", "sh", "-c", this_boot])
            .status
            .code()
            != Some(0)
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the trap was never set"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    env.ok(&["run", "-d", "--name", "trapper", img, "sh", "-c", script]);
    armed(&env);
    let started = Instant::now();
    env.ok(&["stop", "-t", "20", "trapper"]);
    let took = started.elapsed();
    let b = env.state_of("trapper");
    assert_eq!(b["exit_code"], 0, "the trap finished: {b}");
    assert!(
        took >= Duration::from_secs(4),
        "stop returned after {took:?}"
    );
    env.ok(&["start", "trapper"]);
    assert_eq!(
        env.ok(&["exec", "trapper", "cat", "/root/clean"]),
        "cleaned\n"
    );

    // One second is not enough for the trap: killed, no file.
    env.ok(&["exec", "trapper", "rm", "/root/clean"]);
    armed(&env);
    let started = Instant::now();
    env.ok(&["stop", "-t", "1", "trapper"]);
    let took = started.elapsed();
    assert_eq!(env.state_of("trapper")["exit_code"], 137);
    assert!(took < Duration::from_secs(4 + 10), "stop took {took:?}");
    env.ok(&["start", "trapper"]);
    let out = env.run(&["exec", "trapper", "cat", "/root/clean"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "the trap was killed before writing"
    );
    env.ok(&["rm", "-f", "trapper"]);
}

#[test]
fn main_process_exit_stops_the_box_with_its_code() {
    let env = Env::new();
    let img = env.busybox();
    env.ok(&[
        "run",
        "-d",
        "--name",
        "short",
        img,
        "sh",
        "-c",
        "echo logged; sleep 2; echo again; exit 4",
    ]);
    // `logs -f` follows the running Box to its end; `logs` prints what it wrote.
    assert_eq!(env.ok(&["logs", "-f", "short"]), "logged\nagain\n");
    let started = Instant::now();
    while env.state_of("short")["state"] != "exited" {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "Box did not stop after its main process"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let b = env.state_of("short");
    assert_eq!(b["exit_code"], 4);
    let log = std::fs::read_to_string(
        env.boxes_dir()
            .join(b["id"].as_str().unwrap())
            .join("main.log"),
    )
    .unwrap();
    assert_eq!(log, "logged\nagain\n");
    assert_eq!(env.ok(&["logs", "short"]), log);
}

#[test]
fn a_killed_vmm_is_reported_and_rm_cleans_everything() {
    let env = Env::new();
    let img = env.busybox();
    env.ok(&["run", "-d", "--name", "victim", img, "sleep", "1000"]);
    let b = env.state_of("victim");
    let id = b["id"].as_str().unwrap().to_string();
    let vmm = b["vmm_pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) of the VMM process the test just read from `ls`.
    unsafe { libc::kill(vmm, libc::SIGKILL) };

    let started = Instant::now();
    while env.state_of("victim")["state"] != "exited" {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "crash not detected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = env.state_of("victim");
    assert!(
        b["exit_reason"]
            .as_str()
            .unwrap()
            .contains("killed by signal 9"),
        "{b}"
    );
    let console = env.boxes_dir().join(&id).join("console.log");
    assert!(
        std::fs::metadata(&console).unwrap().len() > 0,
        "console log kept for diagnosis"
    );

    env.ok(&["rm", "victim"]);
    assert!(!env.boxes_dir().join(&id).exists());
    assert!(
        processes_mentioning(&id).is_empty(),
        "{:?}",
        processes_mentioning(&id)
    );
}

#[test]
fn ten_boxes_created_and_removed_leave_nothing_behind() {
    let env = Env::new();
    let img = env.busybox();
    let mut ids = Vec::new();
    for i in 0..10 {
        let name = format!("loop{i}");
        if i % 2 == 0 {
            ids.push(
                env.ok(&["run", "-d", "--name", &name, img, "sleep", "1000"])
                    .trim()
                    .to_string(),
            );
            env.ok(&["rm", "-f", &name]);
        } else {
            ids.push(env.ok(&["create", "--name", &name, img]).trim().to_string());
            env.ok(&["rm", &name]);
        }
    }
    assert_eq!(std::fs::read_dir(env.boxes_dir()).unwrap().count(), 0);
    for id in ids {
        assert!(
            processes_mentioning(&id).is_empty(),
            "processes of {id} remain"
        );
    }
}

#[test]
fn stdin_tty_and_signals_reach_the_process() {
    use std::io::{Read, Write};
    use std::process::Stdio;

    let env = Env::new();
    let img = env.busybox();

    // run -i: stdin streams into the main process and its end closes the process's stdin.
    let mut child = env
        .cmd()
        .args([
            "run",
            "--rm",
            "-i",
            img,
            "sh",
            "-c",
            "tr a-z A-Z; echo done",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello stdin\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO STDIN\ndone\n");

    env.ok(&["run", "-d", "--name", "sig", img, "sleep", "1000"]);
    // exec -t: the process runs on a terminal of the requested size.
    let out = env.ok(&["exec", "-t", "sig", "sh", "-c", "tty; stty size"]);
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert!(out.contains("\r\n"), "terminal output uses CRLF: {out:?}");

    // Ctrl-C on the CLI (SIGINT) reaches the process in the Box.
    let mut child = env
        .cmd()
        .args([
            "exec",
            "sig",
            "sh",
            "-c",
            "trap 'echo got-INT; exit 5' INT; echo ready; while true; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    stdout.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ready\n");
    // SAFETY: kill(2) of the CLI child this test spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(rest, "got-INT\n");
    assert_eq!(status.code(), Some(5));
    env.ok(&["rm", "-f", "sig"]);
}
