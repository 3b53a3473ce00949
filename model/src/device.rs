//! Which device the model runs and trains on: the configured choice (`auto`, `cpu`,
//! `cuda:N`), resolved against what this binary was built with and what answers.

use candle_core::Device;
use serde::Serialize;
use std::fmt;

/// Inference/training device as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!("got {other:?}; allowed: auto, cpu, cuda, cuda:N (N a GPU index)")
                }),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Why a configured device cannot be had.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(String);

/// The device for a configured choice, said in a log line. `auto` is the first CUDA
/// device when this binary has CUDA support and a device answers, else the CPU; `cuda:N`
/// fails (with the reason) when it cannot be had.
pub fn select_device(choice: DeviceChoice) -> Result<Device, DeviceError> {
    let (device, why) = pick_device(choice)?;
    tracing::info!("device: {} ({why})", device_name(&device));
    Ok(device)
}

/// `select_device` without the log line: the device and why it was chosen.
pub fn pick_device(choice: DeviceChoice) -> Result<(Device, String), DeviceError> {
    let built_with_cuda = candle_core::utils::cuda_is_available();
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, "device cpu configured".into())),
        DeviceChoice::Auto if !built_with_cuda => Ok((
            Device::Cpu,
            "auto: this binary was built without CUDA support".into(),
        )),
        DeviceChoice::Auto => match Device::new_cuda(0) {
            Ok(d) => Ok((d, "auto: a CUDA device answered".into())),
            Err(e) => Ok((
                Device::Cpu,
                format!(
                    "auto: no CUDA device answered: {}",
                    first_line(&e.to_string())
                ),
            )),
        },
        DeviceChoice::Cuda(n) if !built_with_cuda => Err(DeviceError(format!(
            "device cuda:{n} requested but this binary was built without CUDA support (build with `--features cuda`); or use device cpu (`device: cpu` in the config, or --device cpu)"
        ))),
        DeviceChoice::Cuda(n) => match Device::new_cuda(n) {
            Ok(d) => Ok((d, format!("device cuda:{n} configured"))),
            Err(e) => Err(DeviceError(format!(
                "device cuda:{n} requested but it cannot be opened: {}; check the NVIDIA driver and the device number, or use device cpu",
                first_line(&e.to_string())
            ))),
        },
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_named_cpu_and_chosen_when_configured() {
        let (d, why) = pick_device(DeviceChoice::Cpu).unwrap();
        assert!(d.is_cpu());
        assert_eq!(device_name(&d), "cpu");
        assert!(why.contains("configured"), "{why}");
    }

    #[test]
    fn device_names_parse_into_choices() {
        assert_eq!("cuda:1".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(1)));
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cpu".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    // A CPU build: `auto` falls back to the CPU and says why; `cuda` is refused with the fix.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_support_auto_is_cpu_and_cuda_is_refused() {
        let (d, why) = pick_device(DeviceChoice::Auto).unwrap();
        assert!(d.is_cpu());
        assert!(why.contains("built without CUDA"), "{why}");
        let e = pick_device(DeviceChoice::Cuda(1)).unwrap_err().to_string();
        assert!(e.contains("cuda:1") && e.contains("--features cuda"), "{e}");
    }

    // A CUDA build: `auto` is a CUDA device if one answers, else the CPU with the reason;
    // an explicit device that cannot be opened is an error naming it.
    #[cfg(feature = "cuda")]
    #[test]
    fn with_cuda_support_auto_follows_the_device() {
        let (d, why) = pick_device(DeviceChoice::Auto).unwrap();
        match Device::new_cuda(0) {
            Ok(_) => {
                assert!(d.is_cuda(), "{why}");
                assert_eq!(device_name(&d), "cuda:0");
            }
            Err(_) => {
                assert!(d.is_cpu());
                assert!(why.contains("no CUDA device answered"), "{why}");
            }
        }
        let e = pick_device(DeviceChoice::Cuda(4096))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cuda:4096"), "{e}");
    }
}
