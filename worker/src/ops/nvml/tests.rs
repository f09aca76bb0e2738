use super::*;

#[test]
fn a_healthy_gpu_reads_healthy() {
    let r = Readings {
        xids: vec![],
        uncorrected_ecc: Some(0),
        pages_pending_retirement: Some(false),
        temperature_celsius: Some(HOT_CELSIUS - 1),
        hardware_slowdown: Some(false),
    };
    assert_eq!(classify(&r), Health::Healthy);
    assert_eq!(classify(&Readings::default()), Health::Healthy, "nothing reported");
}

#[test]
fn fatal_xids_and_uncorrectable_ecc_errors_are_unrecoverable() {
    for xid in FATAL_XIDS {
        let r = Readings {
            xids: vec![13, xid],
            ..Readings::default()
        };
        assert_eq!(classify(&r), Health::Unrecoverable(format!("XID {xid}")), "{xid}");
    }
    let r = Readings {
        uncorrected_ecc: Some(2),
        temperature_celsius: Some(95),
        ..Readings::default()
    };
    assert_eq!(classify(&r), Health::Unrecoverable("2 uncorrectable ECC errors".into()));
}

#[test]
fn warnings_are_degraded_and_all_named() {
    let r = Readings {
        xids: vec![31],
        uncorrected_ecc: Some(0),
        pages_pending_retirement: Some(true),
        temperature_celsius: Some(HOT_CELSIUS),
        hardware_slowdown: Some(true),
    };
    assert_eq!(
        classify(&r),
        Health::Degraded("XID 31, retired pages pending a GPU reset, 90 °C, hardware slowdown".into())
    );
}

#[test]
fn cuda_uuids_become_nvml_uuids() {
    let bytes = [
        0x4f, 0x1a, 0x2b, 0x3c, 0x4d, 0x5e, 0x6f, 0x70, 0x81, 0x92, 0xa3, 0xb4, 0xc5, 0xd6, 0xe7, 0xf8,
    ];
    assert_eq!(nvml_uuid(bytes), "GPU-4f1a2b3c-4d5e-6f70-8192-a3b4c5d6e7f8");
}

/// Where there is no NVIDIA driver (this CPU machine, CI), opening the source fails with a
/// reason and nothing else happens: the worker runs without it.
#[test]
fn without_a_driver_the_source_is_refused_not_fatal() {
    if std::path::Path::new("/dev/nvidiactl").exists() {
        eprintln!("skipped: this machine has an NVIDIA driver");
        return;
    }
    let e = NvmlHealth::open("GPU-00000000-0000-0000-0000-000000000000")
        .err()
        .expect("no NVML without a driver");
    assert!(!e.to_string().is_empty());
}
