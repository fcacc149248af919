//! Weights in HF's safetensors layout: `model.safetensors`, or shards listed
//! by `model.safetensors.index.json`. Loading checks every name, shape and
//! dtype against the model and says exactly what does not fit.

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a safetensors file: {msg}")]
    Format { path: String, msg: String },
    #[error(
        "{dir}: no model.safetensors or model.safetensors.index.json (is this an HF model folder?)"
    )]
    NoWeights { dir: String },
    #[error("{dir}: weights do not fit the model: {details}")]
    Mismatch { dir: String, details: String },
    #[error(
        "{path}: tensor {name} has dtype {dtype:?}, which medzero cannot load (F32, F16, BF16, F64)"
    )]
    Dtype {
        path: String,
        name: String,
        dtype: Dtype,
    },
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    match kind {
        Kind::Float => Some(Dtype::F32),
        Kind::Half => Some(Dtype::F16),
        Kind::BFloat16 => Some(Dtype::BF16),
        Kind::Double => Some(Dtype::F64),
        Kind::Int64 => Some(Dtype::I64),
        _ => None,
    }
}

/// The safetensors files of a model folder.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(WeightsError::NoWeights {
            dir: dir.display().to_string(),
        });
    }
    let p = index.display().to_string();
    let text = std::fs::read_to_string(&index).map_err(|source| WeightsError::Io {
        path: p.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| WeightsError::Format {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| WeightsError::Format {
            path: p.clone(),
            msg: "no weight_map object".into(),
        })?;
    let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Names HF checkpoints may carry that the model does not use.
fn ignorable(name: &str, tied: bool) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight")
}

/// Copies the folder's weights into `vars` (the model's variables by HF
/// name), converting dtype to each variable's. Every variable must be found
/// with its exact shape, and the files must hold nothing else.
pub fn load(dir: &Path, vars: &HashMap<String, Tensor>, tied: bool) -> Result<(), WeightsError> {
    let mut seen = BTreeSet::new();
    let mut unexpected = Vec::new();
    let mut wrong_shape = Vec::new();
    for file in weight_files(dir)? {
        let p = file.display().to_string();
        let bytes = std::fs::read(&file).map_err(|source| WeightsError::Io {
            path: p.clone(),
            source,
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| WeightsError::Format {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        for (name, view) in st.tensors() {
            let Some(var) = vars.get(&name) else {
                if !ignorable(&name, tied) {
                    unexpected.push(name);
                }
                continue;
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                wrong_shape.push(format!("{name}: file {shape:?}, model {:?}", var.size()));
                continue;
            }
            let kind = kind_of(view.dtype()).ok_or_else(|| WeightsError::Dtype {
                path: p.clone(),
                name: name.clone(),
                dtype: view.dtype(),
            })?;
            let t = Tensor::f_from_data_size(view.data(), &shape, kind).map_err(|e| {
                WeightsError::Format {
                    path: p.clone(),
                    msg: format!("{name}: {e}"),
                }
            })?;
            tch::no_grad(|| {
                let mut var = var.shallow_clone();
                var.copy_(&t.to_kind(var.kind()).to_device(var.device()));
            });
            seen.insert(name);
        }
    }
    let missing: Vec<&String> = vars
        .keys()
        .filter(|k| !seen.contains(*k))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if missing.is_empty() && unexpected.is_empty() && wrong_shape.is_empty() {
        return Ok(());
    }
    let list = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        let more = v.len().saturating_sub(5);
        v.truncate(5);
        v.join(", ")
            + &if more > 0 {
                format!(" (+{more} more)")
            } else {
                String::new()
            }
    };
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "missing {}",
            list(&missing.into_iter().cloned().collect::<Vec<_>>())
        ));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected {}", list(&unexpected)));
    }
    if !wrong_shape.is_empty() {
        parts.push(format!("wrong shape {}", list(&wrong_shape)));
    }
    Err(WeightsError::Mismatch {
        dir: dir.display().to_string(),
        details: parts.join("; "),
    })
}

struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The bytes of a safetensors file holding `tensors` (copied to the host).
pub fn to_bytes(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, WeightsError> {
    let mut owned: BTreeMap<&str, Owned> = BTreeMap::new();
    for (name, t) in tensors {
        let t = t.detach().to_device(tch::Device::Cpu).contiguous();
        let dtype = dtype_of(t.kind()).ok_or_else(|| WeightsError::Format {
            path: "(serialising)".into(),
            msg: format!("{name}: tensors of kind {:?} cannot be saved", t.kind()),
        })?;
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut data, numel);
        let shape = t.size().iter().map(|&d| d as usize).collect();
        owned.insert(name.as_str(), Owned { dtype, shape, data });
    }
    safetensors::serialize(owned.iter().map(|(k, v)| (*k, v)), metadata).map_err(|e| {
        WeightsError::Format {
            path: "(serialising)".into(),
            msg: e.to_string(),
        }
    })
}

/// Reads every tensor of one safetensors file (for optimizer state and tests).
pub fn read_all(path: &Path) -> Result<Vec<(String, Tensor)>, WeightsError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| WeightsError::Io {
        path: p.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| WeightsError::Format {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        out.push((name.clone(), view_to_tensor(&p, &name, &view)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// A tensor from a safetensors view (floating kinds and I64).
pub fn view_to_tensor(path: &str, name: &str, view: &TensorView) -> Result<Tensor, WeightsError> {
    let kind = match view.dtype() {
        Dtype::I64 => Kind::Int64,
        d => kind_of(d).ok_or_else(|| WeightsError::Dtype {
            path: path.into(),
            name: name.into(),
            dtype: d,
        })?,
    };
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Tensor::f_from_data_size(view.data(), &shape, kind).map_err(|e| WeightsError::Format {
        path: path.into(),
        msg: format!("{name}: {e}"),
    })
}
