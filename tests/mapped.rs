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

/// The address of a CPU tensor's first value.
fn storage_ptr(t: &candle_core::Tensor) -> *const u8 {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        panic!("not on the CPU");
    };
    let at = layout.start_offset();
    match cpu {
        candle_core::CpuStorage::F32(v) => v[at..].as_ptr().cast(),
        candle_core::CpuStorage::BF16(v) => v[at..].as_ptr().cast(),
        _ => panic!("unexpected dtype"),
    }
}

/// The weight loader on both formats (`tools/fixtures/weights.py`): large tensors stored in the
/// run's dtype are maps, everything else (another dtype, a transposed or offset view, a tiny
/// tensor) is copied, and every value is the one the copying reader gives.
#[test]
fn the_loader_maps_large_tensors_and_copies_the_rest() {
    use altdiff::weights::{var_builder, WeightFormat, Weights};
    use candle_core::{DType, Device};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weights");
    let pickle = candle_core::pickle::PthTensors::new(dir.join("pytorch_model.bin"), None).unwrap();
    let reference = |name: &str| pickle.get(name).unwrap().unwrap();
    let same = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        let f = |t: &candle_core::Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(a.dims(), b.dims());
        assert_eq!(f(a), f(b));
    };
    for (format, file) in [
        (WeightFormat::Pickle, "pytorch_model.bin"),
        (WeightFormat::Safetensors, "model.safetensors"),
    ] {
        let weights = Weights {
            format,
            files: vec![dir.join(file)],
        };
        // f32: `big` is a map; `half` (bf16) is converted, so copied.
        let vb = var_builder(&weights, DType::F32, &Device::Cpu).unwrap();
        let big = vb.get((128, 129), "big").unwrap();
        same(&big, &reference("big"));
        assert!(is_mapped(storage_ptr(&big)), "{file}: big");
        let half = vb.get((256, 130), "half").unwrap();
        same(&half, &reference("half"));
        assert!(!is_mapped(storage_ptr(&half)), "{file}: half");
        let small = vb.get(3, "small").unwrap();
        same(&small, &reference("small"));
        assert!(!is_mapped(storage_ptr(&small)));
        if format == WeightFormat::Pickle {
            for (name, shape) in [("trans", (129, 128)), ("view", (128, 130))] {
                let t = vb.get(shape, name).unwrap();
                same(&t, &reference(name));
                assert!(!is_mapped(storage_ptr(&t)), "{name}");
            }
        }
        // bf16: now `half` is the map and `big` the converted copy.
        let vb = var_builder(&weights, DType::BF16, &Device::Cpu).unwrap();
        let half = vb.get((256, 130), "half").unwrap();
        same(&half, &reference("half"));
        assert!(is_mapped(storage_ptr(&half)), "{file}: bf16 half");
        // ... rounded from f32 as candle's conversion rounds (straight from the map for
        // safetensors).
        let big = vb.get((128, 129), "big").unwrap();
        assert_eq!(big.dtype(), DType::BF16);
        same(&big, &reference("big").to_dtype(DType::BF16).unwrap());
        assert!(!is_mapped(storage_ptr(&big)), "{file}: bf16 big");
    }
}

/// The CPU loader reads each tensor when the network asks for it and keeps no reference: once the
/// caller drops it, its map is gone although the `VarBuilder` lives on (a layer that repacks its
/// weight does not hold two copies while the rest of the network loads); asked for again, it is
/// read anew.
#[test]
fn the_cpu_loader_keeps_no_tensor_it_handed_out() {
    use altdiff::weights::{var_builder, WeightFormat, Weights};
    use candle_core::{DType, Device};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weights");
    let path = dir.join("model.safetensors");
    let weights = Weights {
        format: WeightFormat::Safetensors,
        files: vec![path.clone()],
    };
    let before = maps_of(&path);
    let vb = var_builder(&weights, DType::F32, &Device::Cpu).unwrap();
    let opened = maps_of(&path);
    let big = vb.get((128, 129), "big").unwrap();
    assert!(is_mapped(storage_ptr(&big)));
    assert_eq!(maps_of(&path), opened + 1);
    let values = big.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    drop(big);
    assert_eq!(maps_of(&path), opened, "the loader still holds `big`");
    let again = vb.get((128, 129), "big").unwrap();
    assert_eq!(
        again.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        values
    );
    assert!(vb.contains_tensor("big"));
    assert!(vb.get((128, 129), "missing").is_err());
    drop((again, vb));
    assert_eq!(maps_of(&path), before);
}
