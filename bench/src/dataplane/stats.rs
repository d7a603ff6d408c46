//! Summaries of a cell's rounds: medians, and how sure a paired ratio is.

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => f64::midpoint(s[n / 2 - 1], s[n / 2]),
    }
}

/// The geometric mean of per-round ratios and its 95 % confidence interval, `(mean, low,
/// high)`. Ratios are averaged as logarithms, so that a round at 0.9 and one at 1/0.9
/// cancel out, and the interval uses Student's t because a run has few rounds. `None` below two
/// ratios or for a non-positive one.
pub fn ratio_interval(ratios: &[f64]) -> Option<(f64, f64, f64)> {
    if ratios.len() < 2 || ratios.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        return None;
    }
    let logs: Vec<f64> = ratios.iter().map(|r| r.ln()).collect();
    #[allow(clippy::cast_precision_loss)] // a few hundred rounds at most
    let n = logs.len() as f64;
    let mean = logs.iter().sum::<f64>() / n;
    let var = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let half = t95(logs.len() - 1) * (var / n).sqrt();
    Some((mean.exp(), (mean - half).exp(), (mean + half).exp()))
}

/// Two-sided 95 % quantile of Student's t with `df` degrees of freedom; past the table,
/// the quantile of the table's next lower entry, so the interval errs wide.
fn t95(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        31..=40 => 2.042,
        41..=60 => 2.021,
        61..=120 => 2.000,
        _ => 1.980,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-12);
        assert!((median(&[4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-12);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn identical_ratios_have_a_point_interval() {
        let (m, lo, hi) = ratio_interval(&[0.95; 5]).unwrap();
        assert!((m - 0.95).abs() < 1e-12 && (lo - 0.95).abs() < 1e-12 && (hi - 0.95).abs() < 1e-12);
    }

    #[test]
    fn interval_matches_a_hand_computed_t_interval() {
        // logs of e^-0.1, e^0, e^0.1: mean 0, sd 0.1, n 3, t(2) = 4.303.
        let r = [(-0.1f64).exp(), 1.0, 0.1f64.exp()];
        let (m, lo, hi) = ratio_interval(&r).unwrap();
        let half = 4.303 * 0.1 / 3f64.sqrt();
        assert!((m - 1.0).abs() < 1e-12);
        assert!((lo - (-half).exp()).abs() < 1e-9);
        assert!((hi - half.exp()).abs() < 1e-9);
    }

    #[test]
    fn t_quantile_falls_with_df_and_errs_wide_past_the_table() {
        let q: Vec<f64> = (1..200).map(t95).collect();
        assert!(q.windows(2).all(|w| w[0] >= w[1]));
        // Student's t, two-sided 95 %: df 35 → 2.030, df 100 → 1.984, df 1000 → 1.962.
        assert!(t95(35) >= 2.030 && t95(100) >= 1.984 && t95(1000) >= 1.962);
    }

    #[test]
    fn too_few_or_bad_ratios_give_no_interval() {
        assert!(ratio_interval(&[0.9]).is_none());
        assert!(ratio_interval(&[0.9, 0.0]).is_none());
        assert!(ratio_interval(&[0.9, f64::NAN]).is_none());
    }
}
