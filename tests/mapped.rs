//! Weight buffers that are private maps of their file (`altdiff::alloc::mapped`), with altdiff's
//! allocator installed as this test binary's global allocator, as the `altdiff` binary does.
#![cfg(target_os = "linux")]

use altdiff::alloc::mapped::{is_mapped, map_vec, MIN_BYTES};
use std::io::Write;

#[global_allocator]
static ALLOCATOR: altdiff::alloc::Allocator = altdiff::alloc::Allocator;

/// A fresh, empty directory for one test (removed by the test when it passes).
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("altdiff-mapped-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How many maps of `path` this process has.
fn maps_of(path: &std::path::Path) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let name = path.to_str().unwrap();
    maps.lines().filter(|l| l.ends_with(name)).count()
}

/// A file of `skip` bytes, then `n` f32 values.
fn weight_file(dir: &std::path::Path, skip: usize, n: usize) -> (std::path::PathBuf, Vec<f32>) {
    let path = dir.join(format!("w{skip}.bin"));
    let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&vec![0xAB; skip]).unwrap();
    for v in &values {
        f.write_all(&v.to_le_bytes()).unwrap();
    }
    (path, values)
}

#[test]
fn a_mapped_buffer_reads_the_file_never_writes_it_and_is_unmapped_when_freed() {
    let dir = scratch("reads");
    let n = MIN_BYTES; // 4 x MIN_BYTES bytes
    let (path, values) = weight_file(&dir, 4100, n);
    let file = std::fs::File::open(&path).unwrap();
    let before = maps_of(&path);

    let mut v = map_vec::<f32>(&file, 4100, n).expect("mapped");
    assert_eq!(v, values);
    assert!(is_mapped(v.as_ptr().cast()));
    assert_eq!(maps_of(&path), before + 1);

    // Writes stay in the process (copy on write); the file is unchanged.
    v[0] = 42.0;
    v[n - 1] = -1.0;
    assert_eq!((v[0], v[n - 1]), (42.0, -1.0));
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[4100..4104], &values[0].to_le_bytes());

    // Growing moves the values into an ordinary block and unmaps the file.
    v.push(3.0);
    assert_eq!(maps_of(&path), before);
    assert!(!is_mapped(v.as_ptr().cast()));
    assert_eq!((v[0], v[1], v[n], v.len()), (42.0, values[1], 3.0, n + 1));
    drop(v);

    // Freed: no map left behind.
    let w = map_vec::<f32>(&file, 4100, n).expect("mapped");
    assert_eq!(maps_of(&path), before + 1);
    drop(w);
    assert_eq!(maps_of(&path), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn misaligned_or_small_buffers_are_left_to_a_copy() {
    let dir = scratch("misaligned");
    let (path, _) = weight_file(&dir, 2, MIN_BYTES);
    let file = std::fs::File::open(&path).unwrap();
    // An offset that is not a multiple of the element's alignment, and a buffer below MIN_BYTES.
    assert!(map_vec::<f32>(&file, 2, MIN_BYTES / 4).is_none());
    assert!(map_vec::<f32>(&file, 6, 16).is_none());
    // Ordinary allocations are never taken for maps.
    let plain = vec![1f32; MIN_BYTES];
    assert!(!is_mapped(plain.as_ptr().cast()));
    std::fs::remove_dir_all(&dir).unwrap();
}
