//! Where computation runs, and the stamp every benchmark and result carries.

use serde::Serialize;

/// tch 0.26 refuses to build against any libtorch but 2.13.0, so the runtime
/// version is this one.
pub const LIBTORCH_VERSION: &str = "2.13.0";
pub const TCH_VERSION: &str = "0.26.0";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceInfo {
    /// `cpu` or `cuda:N (name)`.
    pub device: String,
    pub cuda_available: bool,
    pub cuda_devices: i64,
    /// libtorch intra-op threads.
    pub torch_threads: i32,
    pub cpu_cores: usize,
    pub libtorch: &'static str,
    pub tch: &'static str,
}

impl DeviceInfo {
    pub fn current(device: tch::Device) -> Self {
        DeviceInfo {
            device: match device {
                tch::Device::Cuda(i) => format!("cuda:{i}"),
                _ => "cpu".to_string(),
            },
            cuda_available: tch::Cuda::is_available(),
            cuda_devices: tch::Cuda::device_count(),
            torch_threads: tch::get_num_threads(),
            cpu_cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            libtorch: LIBTORCH_VERSION,
            tch: TCH_VERSION,
        }
    }

    /// One line for logs and tables.
    pub fn stamp(&self) -> String {
        format!(
            "device {} (cuda available: {}, {} gpus), torch threads {}, {} cpu cores, libtorch {}, tch {}",
            self.device,
            self.cuda_available,
            self.cuda_devices,
            self.torch_threads,
            self.cpu_cores,
            self.libtorch,
            self.tch
        )
    }
}
