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

/// Where models train and generate, as configs and the CLI spell it: `cpu`,
/// `cuda` (the first GPU), `cuda:N`, or `auto` (the first GPU when libtorch
/// sees one, else the CPU). Parsed once, when the config or flag is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
    Auto,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "auto" => Ok(DeviceSpec::Auto),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(DeviceSpec::Cuda(i)),
                _ => Err(format!(
                    "device must be cpu, cuda, cuda:N or auto, got {s:?}"
                )),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceSpec::Auto => write!(f, "auto"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// The libtorch device; a GPU libtorch cannot see is an error, never a
    /// silent fall back to the CPU.
    pub fn resolve(self) -> Result<tch::Device, String> {
        let gpus = tch::Cuda::device_count() as usize;
        match self {
            DeviceSpec::Cpu => Ok(tch::Device::Cpu),
            DeviceSpec::Auto if gpus > 0 => Ok(tch::Device::Cuda(0)),
            DeviceSpec::Auto => Ok(tch::Device::Cpu),
            DeviceSpec::Cuda(i) if i < gpus => Ok(tch::Device::Cuda(i)),
            DeviceSpec::Cuda(_) => Err(format!(
                "device {self} asked for, but libtorch sees {gpus} CUDA device(s) (a CPU-only \
                 machine, or a CPU build of libtorch); use \"cpu\" or \"auto\""
            )),
        }
    }
}
